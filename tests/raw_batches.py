"""Record batches a well-behaved client would never write, sent with Kafka's own Produce request.

A real Kafka rejects most of these on produce; Tansu 0.6 stores a batch whose compressed
payload is garbage (it checks the CRC and the codec id, not the payload), which is exactly what a
consumer must survive: a batch it can fetch but not decode.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence

from kafka import TopicPartition
from kafka.net.compat import KafkaNetClient
from kafka.protocol.producer import ProduceRequest
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.util import calc_crc32c

GZIP = 1


def record_batch(
    values: Sequence[bytes],
    *,
    codec: int = GZIP,
    headers: Sequence[tuple[str, bytes]] = (),
    garble_payload: bool = False,
) -> bytes:
    """A v2 record batch of `values`; `garble_payload` flips bytes of its compressed payload
    and fixes the CRC again, so only decompression can tell."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=codec,
        is_transactional=False,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    now = int(time.time() * 1000)
    for i, value in enumerate(values):
        builder.append(i, timestamp=now, key=None, value=value, headers=list(headers))
    buf = bytearray(builder.build())
    if garble_payload:
        # The tail of a deflate stream: its last blocks and the gzip trailer.
        for i in range(len(buf) - 24, len(buf) - 2):
            buf[i] ^= 0x5A
    crc = calc_crc32c(memoryview(buf)[DefaultRecordBatchBuilder.ATTRIBUTES_OFFSET :])
    struct.pack_into(">I", buf, DefaultRecordBatchBuilder.CRC_OFFSET, crc)
    return bytes(buf)


def produce_batch(servers: Sequence[str], topic: str, batch: bytes, partition: int = 0) -> int:
    """Append `batch` as it is; returns its base offset (raises if the broker refused it)."""
    client = KafkaNetClient(bootstrap_servers=list(servers))
    try:
        client.check_version()
        client.poll(future=client.cluster.request_update(), timeout_ms=10_000)
        node = client.cluster.leader_for_partition(TopicPartition(topic, partition))
        data = ProduceRequest.TopicProduceData
        request = ProduceRequest(
            transactional_id=None,
            acks=-1,
            timeout_ms=10_000,
            topic_data=[
                data(
                    name=topic,
                    partition_data=[data.PartitionProduceData(index=partition, records=batch)],
                )
            ],
            min_version=3,
            max_version=9,
        )
        response = client.send_and_receive(node, request, timeout_ms=10_000)
    finally:
        client.close()
    answer = response.responses[0].partition_responses[0]
    if answer.error_code != 0:
        raise RuntimeError(f"the broker refused the batch: error {answer.error_code}")
    return int(answer.base_offset)
