"""`python -m consumer` runs a worker; `python -m consumer health` checks one (docker healthcheck)."""

import sys

from consumer.service import health_main, main

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(health_main(argv[1:]) if argv[:1] == ["health"] else main(argv))
