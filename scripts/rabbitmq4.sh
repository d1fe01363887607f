#!/usr/bin/env bash
# A RabbitMQ 4.x node beside this machine's own broker, to run the broker tests against the
# version production runs (docker-compose.yml pins 4.x; Debian bookworm ships 3.10 and an Erlang
# too old for 4.x). Debian's RabbitMQ 4 needs a newer glibc than bookworm's, so it runs in a
# chroot of a newer Debian, made with debootstrap (root, Debian's package mirror, ~3 min and
# ~600 MB the first time). It shares the network: its AMQP port is PORT on 127.0.0.1; the broker
# on 5672 is never touched. Not part of CI.
#
#   sudo bash scripts/rabbitmq4.sh start [sid|trixie] [PORT] [DIR]   # sid: 4.3.x, trixie: 4.0.x
#   eval "$(bash scripts/rabbitmq4.sh env [sid|trixie] [PORT] [DIR])" && bash scripts/test.sh tests/consumer
#   sudo bash scripts/rabbitmq4.sh stop [sid|trixie] [PORT] [DIR]
#
# `env` prints LORAQ_TEST_AMQP_URL, RABBITMQ_NODENAME and a PATH whose `rabbitmqctl` talks to this
# node (the fault tests call it), and LORAQ_TEST_RABBITMQ_BIN, so that the cluster tests
# (`-m cluster`) start their nodes from this RabbitMQ too. The node loads the plugin
# rabbitmq_consistent_hash_exchange, as compose does.
set -euo pipefail
cmd=${1:?usage: rabbitmq4.sh start|env|stop [sid|trixie] [PORT] [DIR]}
suite=${2:-sid}
port=${3:-5673}
dir=${4:-/var/tmp/loraq-rabbitmq-$suite}
root=$dir/root
node=loraq$port@localhost

ctl() {  # rabbitmqctl of the chroot, on this node
    chroot "$root" /usr/bin/env HOME=/root /usr/lib/rabbitmq/bin/rabbitmqctl -n "$node" "$@"
}

case $cmd in
start)
    if [ ! -x "$root/usr/lib/rabbitmq/bin/rabbitmq-server" ]; then
        command -v debootstrap > /dev/null || apt-get install -y -q debootstrap
        echo "debootstrap $suite into $root (a few minutes) ..."
        mkdir -p "$dir"
        debootstrap --variant=minbase --include=rabbitmq-server "$suite" "$root" http://deb.debian.org/debian \
            > "$dir/debootstrap.log" || { tail -5 "$dir/debootstrap.log"; exit 1; }
    fi
    mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
    mountpoint -q "$root/dev" || mount --bind /dev "$root/dev"
    # /tmp shared: the cluster tests' nodes (tests/cluster.py) keep config, cookie and data there
    mountpoint -q "$root/tmp" || mount --bind /tmp "$root/tmp"
    cp /etc/hosts "$root/etc/hosts"  # the node is name@localhost
    mkdir -p "$root/etc/loraq"
    printf 'loopback_users.guest = true\nlisteners.tcp.default = %s\n' "$port" > "$root/etc/loraq/rabbitmq.conf"
    echo '[rabbitmq_consistent_hash_exchange].' > "$root/etc/loraq/enabled_plugins"
    setsid chroot "$root" /usr/bin/env HOME=/root RABBITMQ_NODENAME="$node" RABBITMQ_NODE_PORT="$port" \
        RABBITMQ_DIST_PORT=$((port + 20000)) RABBITMQ_CONFIG_FILE=/etc/loraq/rabbitmq \
        RABBITMQ_ENABLED_PLUGINS_FILE=/etc/loraq/enabled_plugins \
        RABBITMQ_MNESIA_BASE=/var/lib/loraq/mnesia RABBITMQ_LOG_BASE=/var/log/loraq \
        /usr/lib/rabbitmq/bin/rabbitmq-server < /dev/null > "$dir/server.log" 2>&1 &
    for _ in $(seq 60); do
        ctl -q await_startup > /dev/null 2>&1 && break
        sleep 1
    done
    ctl -q status | grep -i "RabbitMQ version"
    ;;
env)
    mkdir -p "$dir/bin"
    for tool in rabbitmq-server rabbitmqctl; do  # the environment passes through chroot as it is
        printf '#!/bin/sh\nexec chroot "%s" /usr/lib/rabbitmq/bin/%s "$@"\n' "$root" "$tool" > "$dir/bin/$tool"
        chmod +x "$dir/bin/$tool"
    done
    echo "export LORAQ_TEST_AMQP_URL=amqp://guest:guest@127.0.0.1:$port/ RABBITMQ_NODENAME=$node" \
         "LORAQ_TEST_RABBITMQ_BIN=$dir/bin PATH=$dir/bin:\$PATH"
    ;;
stop)
    ctl stop || true
    umount "$root/tmp" "$root/dev" "$root/proc" 2> /dev/null || true
    ;;
*)
    echo "unknown command $cmd" >&2
    exit 2
    ;;
esac
