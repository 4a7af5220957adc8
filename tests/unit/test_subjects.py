"""Subject naming and the stream's partition mapping (pure)."""

from __future__ import annotations

import pytest

from core.jetstream import event_stream_config, nats_servers, stream_partitions
from core.subjects import EventSubject, parse_event_subject, partition_filter, partitions_of_mapping


def test_new_streams_map_every_event_subject_to_a_partition_of_its_stream_id() -> None:
    config = event_stream_config("S", "cqrs.events", partitions=8)
    assert config.subject_transform is not None
    assert config.subject_transform.src == "cqrs.events.*.*"
    assert config.subject_transform.dest == "cqrs.events.{{partition(8,2)}}.{{wildcard(1)}}.{{wildcard(2)}}"
    assert config.subjects == ["cqrs.events.>"]  # the mapped subjects stay under the stream's subjects
    assert stream_partitions(config) == 8
    assert partition_filter(3, "cqrs.events") == "cqrs.events.3.>"


def test_zero_partitions_means_no_mapping_and_replicas_pass_through() -> None:
    config = event_stream_config("S", "x.events", partitions=0, replicas=3)
    assert config.subject_transform is None
    assert stream_partitions(config) == 0
    assert config.num_replicas == 3


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("cqrs.events.3.order.abc", EventSubject(3, "order", "abc")),
        ("cqrs.events.order.abc", EventSubject(None, "order", "abc")),  # stored before the mapping existed
        ("cqrs.events.order", None),
        ("cqrs.events.1.2.3.4", None),
        ("cqrs.events..x", None),
        ("other.events.order.abc", None),
    ],
)
def test_event_subjects_parse_with_or_without_their_partition(subject: str, expected: EventSubject | None) -> None:
    assert parse_event_subject(subject, "cqrs.events") == expected


def test_partition_count_is_read_back_from_the_destination_only_when_it_is_ours() -> None:
    assert partitions_of_mapping("cqrs.events.{{partition(16,2)}}.{{wildcard(1)}}.{{wildcard(2)}}") == 16
    assert partitions_of_mapping("cqrs.events.{{wildcard(1)}}") == 0
    assert partitions_of_mapping(None) == 0


def test_a_cluster_url_list_is_split_for_the_client() -> None:
    assert nats_servers("nats://a:4222, nats://b:4222,,") == ["nats://a:4222", "nats://b:4222"]
    assert nats_servers("nats://a:4222") == ["nats://a:4222"]
