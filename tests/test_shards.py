"""Shards: packed into a real S3 server (moto on 127.0.0.1), streamed by ranks and workers with exact epochs,
trained from (kill and resume; two torchrun nodes with c10d rendezvous), evaluated from, and refused with one
clear line when they are missing, cut short, altered or out of step with their index."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile

import pytest
import torch
from torch.utils.data import DataLoader

from bincount.cli import main
from bincount.config import PrepareConfig, ShardConfig, SyntheticConfig
from bincount.data import shards
from bincount.data.abid import image_key
from bincount.data.dataset import Item, load_split
from bincount.data.prepare import prepare
from bincount.data.synthetic import generate
from bincount.model.preprocess import read_image
from bincount.processes import free_port
from bincount.store import open_store
from bincount.train import sampling
from bincount.train.loop import checkpoint_key, train, weights_digest
from training_data import (DATASET, count_same_bin_pairs, subprocess_env, tiny_args, tiny_config, train_command,
                           train_full_and_kill_resumed, with_bins)

CLASSES = [1, 2, 3, 4, 5]
SIZE = 48


@pytest.fixture(scope="module")
def bucket_env(s3_server):
    with pytest.MonkeyPatch.context() as mp:
        for name, value in s3_server.env().items():
            mp.setenv(name, value)
        yield s3_server


def _errors(capsys) -> list[str]:
    """What the command wrote to stderr, without the in-process S3 server's access log."""
    return [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("127.0.0.1 - -")]


def _dataset(server, n: int = 80) -> str:
    store = f"s3://{server.new_bucket('shards')}"
    generate(SyntheticConfig(dest=store, n=n, seed=0, width=(160, 200), height=(128, 160)))
    prepare(PrepareConfig(store=store, name=DATASET, workers=4))
    return store


@pytest.fixture(scope="module")
def packed(bucket_env) -> str:
    """A tiny dataset in S3 with shards of 9 samples at the training size."""
    store = _dataset(bucket_env)
    shards.pack(ShardConfig(store=store, name=DATASET, image_size=SIZE, shard_samples=9, workers=4))
    return store


def _index(store: str, split: str = "train") -> shards.ShardIndex:
    return shards.read_index(open_store(store), DATASET, split)


def _object(store: str, split: str, name: str) -> str:
    return f"{shards.prefix(DATASET, split)}/{name}"


def test_pack_writes_checksummed_deterministic_shards_and_a_rerun_writes_nothing(packed, bucket_env, capsys):
    store = open_store(packed)
    for split in ("train", "val", "test"):
        index = _index(packed, split)
        manifest = load_split(store, DATASET, split, CLASSES)
        assert sorted(i.key for i in index.items()) == sorted(i.key for i in manifest)
        assert index.manifest_sha256 == shards.manifest_digest(manifest) and index.image_size == SIZE
        assert index.encoding == ("jpeg" if split == "train" else "png")
        assert all(s.samples <= 9 for s in index.shards) and not index.skipped
        for shard in index.shards:
            data = store.get(_object(packed, split, shard.name))
            assert len(data) == shard.bytes and hashlib.sha256(data).hexdigest() == shard.sha256
    before = {o.key: o.modified for o in store.list(shards.prefix(DATASET, ""))}

    assert main(["data", "shard", "--store", packed, "--name", DATASET, "--image-size", str(SIZE),
                 "--shard-samples", "9"]) == 0
    assert capsys.readouterr().out.count("up to date, nothing written") == 3
    assert {o.key: o.modified for o in store.list(shards.prefix(DATASET, ""))} == before

    again = f"s3://{bucket_env.new_bucket('shards')}"       # the same inputs elsewhere: byte-identical shards
    for o in store.list("datasets/"):
        if o.key.endswith(".jsonl"):
            open_store(again).put(o.key, store.get(o.key))
    for key in {image_key(i.key) for split in ("train", "val", "test") for i in _index(packed, split).items()}:
        open_store(again).put(key, store.get(key))
    shards.pack(ShardConfig(store=again, name=DATASET, image_size=SIZE, shard_samples=9, workers=2))
    for split in ("train", "val", "test"):
        assert [s.sha256 for s in _index(again, split).shards] == [s.sha256 for s in _index(packed, split).shards]


def test_streamed_squares_are_the_served_tensor_lossless_for_evaluation_close_for_training(packed):
    store = open_store(packed)
    # JPEG 95 of these 48 px drawn shapes moves a pixel by 3.5 levels of 255 on average (1.4 on 224 px real
    # photos), far inside the ±20 % brightness jitter training adds anyway
    for split, worst_mean in (("val", 0.0), ("train", 6.0)):
        index = _index(packed, split)
        stream = shards.ShardStream(packed, index, CLASSES, ordered=True)
        for (square, target, position), item in zip(stream, index.items()):
            served = read_image(store.get(image_key(item.key)), SIZE)       # what the server computes
            diff = (square.int() - served.int()).abs().float().mean().item()
            assert diff <= worst_mean and CLASSES[target] == item.label


@pytest.mark.parametrize("sizes,world,workers,batch", [
    ([9] * 6 + [2], 2, 3, 4), ([9] * 6 + [2], 3, 2, 5), ([1, 7, 3], 2, 1, 1), ([5], 4, 2, 2), ([30, 30], 1, 4, 8),
])
def test_an_epoch_reads_every_sample_once_and_gives_every_rank_the_same_batches(sizes, world, workers, batch):
    index = shards.ShardIndex(DATASET, "train", SIZE, "jpeg", 95, 0, max(sizes), "x", tuple(
        shards.Shard(f"s{n}", 1, "x", ("k",) * size, (1,) * size, tuple(range(size + 1)), ("",) * size)
        for n, size in enumerate(sizes)))
    total = sum(sizes)
    for epoch in (1, 2):
        seen, per_rank = [], []
        for rank in range(world):
            counts = []
            for worker in range(workers):
                pieces = shards.epoch_slices(index, rank=rank, world=world, worker=worker, workers=workers,
                                             batch_size=batch, seed=7, epoch=epoch, shuffle=True, drop_last=True)
                counts.append(sum(b - a for _, a, b in pieces))
                seen += [(s, i) for s, a, b in pieces for i in range(a, b)]
            assert all(c % batch == 0 for c in counts[:-1])         # whole batches but for the last worker's
            per_rank.append(sum(counts))
        assert len(seen) == len(set(seen))                          # no sample twice
        assert len(set(per_rank)) == 1                              # the same steps on every rank
        assert total - len(seen) < world * batch                    # at most a ragged tail is dropped
        ordered = [p for rank in range(world) for p in shards.epoch_slices(
            index, rank=rank, world=world, worker=0, workers=1, batch_size=batch, seed=0, epoch=epoch,
            shuffle=False, drop_last=False)]
        assert sum(b - a for _, a, b in ordered) == total           # evaluation: every sample, in order
        assert [s for s, _, _ in ordered] == sorted(s for s, _, _ in ordered)
    orders = {e: [s for s, _, _ in shards.epoch_slices(index, rank=0, world=1, worker=0, workers=1, batch_size=1,
                                                       seed=7, epoch=e, shuffle=True, drop_last=True)]
              for e in range(1, 6)}
    assert len(sizes) < 3 or len({tuple(o) for o in orders.values()}) > 1      # the shard order moves per epoch


def test_shuffled_stream_is_the_same_for_an_epoch_and_changes_between_epochs(packed):
    index = _index(packed)

    def keys(epoch: int) -> list[int]:
        stream = shards.ShardStream(packed, index, CLASSES, rank=0, world=1, batch_size=4, shuffle=True,
                                    drop_last=True, seed=1, buffer=16, ordered=True)
        stream.set_epoch(epoch)
        positions = [p for _, _, p in DataLoader(stream, batch_size=4, num_workers=2)]
        return torch.cat(positions).tolist()

    first, again, second = keys(1), keys(1), keys(2)
    assert first == again and first != second
    assert len(first) == len(set(first)) and index.samples - len(first) < 4
    assert len(first) == len(shards.ShardStream(packed, index, CLASSES, batch_size=4, drop_last=True))


def test_packing_keeps_a_bins_photos_in_one_shard_and_cuts_between_bins():
    items = [Item(f"k{i}", 1 + i % 5, "b" if i < 12 else f"c{i // 2}" if i < 20 else "") for i in range(30)]
    cut = list(shards.chunks(items, 5, random.Random(0)))
    assert sorted(i.key for chunk in cut for i in chunk) == sorted(i.key for i in items)
    assert [len(c) for c in cut if any(i.bin == "b" for i in c)] == [12]      # larger than a shard: one of its own
    assert all(len(c) <= 5 for c in cut if not any(i.bin == "b" for i in c))
    for chunk in cut:
        for b in {i.bin for i in chunk} - {""}:
            members = [n for n, i in enumerate(chunk) if i.bin == b]
            assert members == list(range(members[0], members[0] + len(members)))     # side by side
            assert len(members) == sum(i.bin == b for i in items)                    # whole


def test_the_same_bin_ranking_trains_from_shards_with_a_bins_photos_in_one_batch(packed, tmp_path, monkeypatch,
                                                                                  capsys):
    twins = with_bins(packed)
    shards.pack(ShardConfig(store=packed, name=f"{DATASET}-bins", image_size=SIZE, shard_samples=9, workers=2))
    index = shards.read_index(open_store(packed), f"{DATASET}-bins", "train")
    assert sum(bool(i.bin) for i in index.items()) == 2 * twins
    bins = sampling.bin_ids(index.items())
    stream = shards.ShardStream(packed, index, CLASSES, batch_size=4, shuffle=True, drop_last=True, seed=1,
                                buffer=16, bins=bins)
    order = [b for _, _, b in stream]
    runs = [b for n, b in enumerate(order) if b >= 0 and (n == 0 or order[n - 1] != b)]
    assert len(runs) == len(set(runs)) >= twins - 1     # every bin one run through the buffer (the tail may drop)

    compared = count_same_bin_pairs(monkeypatch)
    train(tiny_config(packed, "shard-bins", tmp_path / "cache", dataset=f"{DATASET}-bins", data="shards",
                      same_bin_rank_weight=1.0, epochs=2, batch_size=8, workers=2))
    err = "\n".join(_errors(capsys))
    assert "data: shards" in err and f"same-bin ranking: {2 * twins} training photos in {twins} bins" in err
    # shuffled photo by photo, ~7/N of pairs would share a batch of 8; whole bins split only at a batch's edge
    assert twins >= 8 and sum(compared) >= 2 * 0.7 * twins, (compared, twins)
    assert not (tmp_path / "cache").exists()


def test_an_index_packed_by_an_older_version_asks_for_a_repack(packed):
    old = json.loads(_index(packed).to_json()) | {"version": 2}
    with pytest.raises(shards.ShardError, match="version 2.*rerun `bincount data shard`"):
        shards.ShardIndex.from_json(json.dumps(old), "s3://x/index.json")


def test_training_streams_shards_without_a_local_cache_and_resumes_to_the_uninterrupted_weights(packed, tmp_path):
    cache = tmp_path / "cache"
    args = tiny_args(packed, cache, epochs=3, workers=1, seed=3, data="shards", batch_size=8)
    assert "data: shards" in train_full_and_kill_resumed(args)
    rerun = subprocess.run(train_command(*args, "--run", "resumed"), capture_output=True, text=True,
                           env=subprocess_env(), timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "after epoch 1" in rerun.stderr
    store = open_store(packed)
    digests = [weights_digest(torch.load(io.BytesIO(store.get(checkpoint_key(run))), weights_only=True)["net"])
               for run in ("full", "resumed")]
    assert digests[0] == digests[1]
    assert not cache.exists()                                   # nothing of the dataset on local disk


def test_two_torchrun_nodes_train_from_shards_in_lockstep(packed, tmp_path):
    port = free_port()
    args = [*tiny_args(packed, tmp_path / "cache", epochs=2, data="shards", batch_size=4), "--run-id", "nodes"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "bincount-nodes",
              "-m", "bincount.train", *args]
    nodes = [subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=subprocess_env()) for _ in range(2)]
    outs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    err = outs[0][1] + outs[1][1]
    finals = {line.split("rank ")[1].split(":")[0]: line.rsplit(" ", 1)[1]
              for line in err.splitlines() if "final weights sha256" in line}
    assert set(finals) == {"0", "1"} and len(set(finals.values())) == 1
    assert "data: shards" in err and not (tmp_path / "cache").exists()
    assert sum(out.count(" epoch=") for out, _ in outs) == 2           # rank 0 alone prints the metric lines


def test_the_frozen_backbone_computes_its_feature_cache_from_shards(packed, tmp_path, capsys):
    args = tiny_args(packed, tmp_path / "c", epochs=1, data="shards", freeze="backbone", seed=5)
    assert main(["train", *args, "--run", "frozen"]) == 0
    err = "\n".join(_errors(capsys))
    assert "data: shards" in err and err.count("features: computed") == 2
    assert not (tmp_path / "c").exists()
    index = _index(packed)
    key = next(o.key for o in open_store(packed).list(f"datasets/{DATASET}/cache/features/") if "/train-" in o.key)
    blob = torch.load(io.BytesIO(open_store(packed).get(key)), weights_only=True)
    assert blob["labels"].tolist() == [CLASSES.index(i.label) for i in index.items()]     # in the shards' order


def test_evaluate_reads_the_test_shards_and_agrees_with_the_cache(packed, tmp_path, capsys):
    assert main(["train", *tiny_args(packed, tmp_path / "c", epochs=1, data="shards"), "--run", "ev"]) == 0
    results = {}
    for data in ("shards", "cache"):
        out = tmp_path / data
        assert main(["evaluate", "--store", packed, "--model", "ev", "--dataset", DATASET, "--data", data,
                     "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--precision", "fp32"]) == 0
        results[data] = {json.loads(line)["key"]: json.loads(line)["probabilities"]
                         for line in (out / "predictions.jsonl").read_text().splitlines()}
    assert results["shards"].keys() == results["cache"].keys()
    for key, probs in results["shards"].items():
        assert probs == pytest.approx(results["cache"][key], abs=1e-5)


def _damaged(server, packed: str, change) -> str:
    """A copy of the packed dataset's manifests and shards with one change made to it."""
    store, src = f"s3://{server.new_bucket('broken')}", open_store(packed)
    for o in src.list("datasets/"):
        open_store(store).put(o.key, src.get(o.key))
    change(open_store(store), _index(packed))
    return store


def _first_shard(index: shards.ShardIndex) -> str:
    return _object("", "train", index.shards[0].name)


def _put_index(store, index: shards.ShardIndex) -> None:
    store.put_text(f"{shards.prefix(DATASET, 'train')}/{shards.INDEX}", index.to_json())


def _corrupt_first_image(store, index: shards.ShardIndex) -> None:
    """Garbage in place of sample 0's JPEG, the index updated to match: a packed image that cannot decode."""
    data = bytearray(store.get(_first_shard(index)))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        start = tar.getmembers()[0].offset_data
    data[start:start + 4] = b"junk"
    store.put(_first_shard(index), bytes(data))
    first = index.shards[0]
    fixed = dataclasses.replace(first, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    _put_index(store, dataclasses.replace(index, shards=(fixed, *index.shards[1:])))


@pytest.mark.parametrize("change,message", [
    (lambda s, i: s.delete(_first_shard(i)), "is missing"),
    (lambda s, i: s.put(_first_shard(i), s.get(_first_shard(i))[:-3000]), "truncated"),
    (lambda s, i: s.put(_first_shard(i), s.get(_first_shard(i))[:1000] + b"\x01"
                        + s.get(_first_shard(i))[1001:]), "fails its checksum"),
    (lambda s, i: _put_index(s, dataclasses.replace(i, shards=(dataclasses.replace(
        i.shards[0], keys=i.shards[0].keys[::-1], labels=i.shards[0].labels[::-1]), *i.shards[1:]))),
     "disagrees with its index"),
])
def test_a_damaged_shard_stops_training_with_one_line_naming_it_and_no_checkpoint(packed, bucket_env, tmp_path,
                                                                                  capsys, change, message):
    store = _damaged(bucket_env, packed, change)
    index = _index(store)
    code = main(["train", *tiny_args(store, tmp_path, epochs=1, data="shards", batch_size=100), "--run", "x"])
    err = _errors(capsys)
    assert code == 1 and message in err[-1] and index.shards[0].name in err[-1], err[-3:]
    assert not any("Traceback" in line for line in err)
    assert not open_store(store).exists(checkpoint_key("x"))


def test_a_corrupt_image_in_a_shard_is_skipped_with_a_warning(packed, bucket_env, capsys):
    store = _damaged(bucket_env, packed, _corrupt_first_image)
    index = _index(store)
    read = list(shards.ShardStream(store, index, CLASSES, ordered=True))
    assert len(read) == index.samples - 1 and 0 not in [p for _, _, p in read]
    assert any(f"skipped the corrupt image of bin {index.shards[0].keys[0]}" in line for line in _errors(capsys))


def test_forced_shards_without_shards_and_bad_shard_options_fail_with_one_clear_line(bucket_env, tmp_path, capsys):
    store = _dataset(bucket_env, n=30)
    capsys.readouterr()
    assert main(["train", *tiny_args(store, tmp_path, data="shards"), "--run", "y"]) == 1
    err = _errors(capsys)
    assert "has no shards of its train split" in err[-1] and "bincount data shard" in err[-1]
    assert not any("Traceback" in line for line in err)
    assert main(["data", "shard", "--store", store, "--name", "nope"]) == 1
    assert "no train split" in _errors(capsys)[-1]
    assert main(["data", "shard", "--store", store, "--name", DATASET, "--quality", "0"]) == 1
    assert "quality must be 1-100" in _errors(capsys)[-1]
    shards.pack(ShardConfig(store=store, name=DATASET, image_size=32))
    assert main(["train", *tiny_args(store, tmp_path, data="shards"), "--run", "y"]) == 1
    assert "hold 32 px squares, the model needs 48 px" in _errors(capsys)[-1]


def test_cluster_jobs_reach_the_store_by_secret_and_the_gpu_overlay_sizes_each_ranks_loader():
    """What a multi-node PyTorchJob and a Katib trial need to stream shards, read from the builders' profiles: the
    store's settings, its keys as files of the mounted S3 Secret, and a loader sized per rank."""
    from bincount.config import ClusterConfig
    from bincount.k8s.conventions import CREDENTIALS_DIR
    from bincount.k8s.manifests import profiles, stages
    from bincount.train import entry

    cluster = ClusterConfig()
    gpu = profiles(cluster)["gpu"]
    job = stages(gpu, cluster)["training"]["pytorchjob.yaml"][0]
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["S3_ENDPOINT"]["value"] == cluster.s3_endpoint
        assert {env[f"{k}_FILE"]["value"] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")} == {
            f"{CREDENTIALS_DIR}/AWS_ACCESS_KEY_ID", f"{CREDENTIALS_DIR}/AWS_SECRET_ACCESS_KEY"}
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert [mounts[name] for name, secret in secrets.items() if secret == cluster.s3_secret] == [CREDENTIALS_DIR]
        cfg = entry.config(entry.parser().parse_args(container["args"]))
        assert cfg.data == "auto" and cfg.workers == gpu.training.cpu_threads - 2 and cfg.prefetch_factor == 4
    trial = json.dumps(stages(gpu, cluster)["tuning"]["experiment.yaml"][0]["spec"]["trialTemplate"])
    assert "prefetch_factor=4" in trial and cluster.s3_secret in trial and "AWS_ACCESS_KEY_ID_FILE" in trial
