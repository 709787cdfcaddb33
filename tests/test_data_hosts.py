"""Multi-host data with uneven record counts: equal epochs per host, disjoint, no repeats.

On a pod every host must take the same number of steps per epoch: a host whose share is
one record longer reaches its epoch boundary later, and the hosts' streams drift apart.
Each epoch is split into equal shares; the ``count % hosts`` records left over (a new
random few every epoch) are the documented remainder.
"""

from __future__ import annotations

import grain
import pytest

from muse_jax import data
from muse_jax.data import pipeline


def _host_epochs(count, hosts, epochs):
  """[host][epoch] -> record ids that host reads in that epoch."""
  records = grain.MapDataset.source(list(range(count)))
  out = []
  for host in range(hosts):
    stream = pipeline._host_records(records, seed=7, process_index=host, process_count=hosts,
                                    config=data.image_data_config())
    length = stream.epoch_length
    out.append([[stream[e * length + i] for i in range(length)] for e in range(epochs)])
  return out


@pytest.mark.parametrize("hosts", [2, 3, 4])
@pytest.mark.parametrize("count", [7, 13, 101])
def test_every_host_gets_an_equal_disjoint_share_of_each_epoch(count, hosts):
  per_host = _host_epochs(count, hosts, epochs=3)
  share = count // hosts
  left_over = []
  for epoch in range(3):
    shares = [per_host[h][epoch] for h in range(hosts)]
    assert all(len(s) == share for s in shares)          # same epoch length on every host
    union = [r for s in shares for r in s]
    assert len(set(union)) == len(union) == count - count % hosts   # no record twice
    left_over.append(frozenset(range(count)) - set(union))
  if count % hosts:   # the remainder is not the same records every epoch
    assert len(set(left_over)) > 1
  # each host's epochs are reshuffled, not replayed
  assert per_host[0][0] != per_host[0][1]


@pytest.mark.parametrize("hosts", [2, 3, 4])
def test_one_record_is_too_few_for_several_hosts(hosts):
  with pytest.raises(data.DataConfigError, match=r"1 training records, too few for "
                                                 rf"{hosts} processes"):
    _host_epochs(1, hosts, epochs=1)


def test_one_record_on_one_host_repeats_every_epoch():
  assert _host_epochs(1, 1, epochs=3) == [[[0], [0], [0]]]


@pytest.mark.parametrize("hosts", [2, 4])
def test_pipelines_of_uneven_hosts_step_through_epochs_together(hosts):
  """15 bundled training photographs over 2 or 4 hosts: a global batch of one epoch's
  worth, two batches per host: each batch is one epoch, hosts disjoint within it."""
  config = data.image_data_config(source="bundled", image_size=16, with_keys=True,
                                  prefetch_batches=0)
  train_count = len(data.sources.bundled_files()) - config.num_eval_images
  share = train_count // hosts
  assert train_count % hosts   # the case under test: an uneven split
  batches = []
  for host in range(hosts):
    with data.build_train_pipeline(config, global_batch_size=share * hosts, seed=3,
                                   process_index=host, process_count=hosts) as pipe:
      batches.append([list(next(pipe)["key"]) for _ in range(2)])
  for epoch in range(2):
    keys = [k for host in range(hosts) for k in batches[host][epoch]]
    assert len(keys) == len(set(keys)) == share * hosts
