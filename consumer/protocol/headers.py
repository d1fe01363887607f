"""The AMQP headers the protocol reads and writes."""

from __future__ import annotations

HEADER_DEADLINE = "x-deadline-ms"  # absolute Unix epoch ms
HEADER_ERROR_CODE = "x-loraq-error-code"  # on dead-lettered jobs: the error_type
HEADER_ERROR = "x-loraq-error"  # on dead-lettered jobs: the human readable reason
HEADER_DELIVERY_COUNT = "x-delivery-count"  # set by quorum queues on redeliveries
HEADER_ADAPTER_ID = "x-adapter-id"  # the job's adapter id: what adapter affinity hashes on
HEADER_DEATHS = "x-death"  # set by RabbitMQ on dead-lettered messages
HEADER_RETRIES = "x-loraq-retries"  # on a job back from the retry queue: its failed attempts so far
