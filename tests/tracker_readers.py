"""Read back what each tracker stored, the way its own tools would see it."""

import glob
import json
import os
import struct
from collections import defaultdict


def wandb_records(run_dir):
    """Every W&B offline run file under run_dir/wandb: [(run id, [(kind, record), ...])], in order.

    The .wandb file is W&B's LevelDB-style log: a 7-byte header (":W&B", 0xBEE1, version 0), then
    32 KiB blocks of chunks (CRC-32C 4 bytes, length 2, type 1: full/first/middle/last), each record a
    protobuf `Record`. (wandb 0.31 no longer ships a Python reader.)
    """
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        data = open(path, "rb").read()
        assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, path
        pos, block, records, partial = 7, 32768, [], b""
        while pos + 7 <= len(data):
            left = block - pos % block
            if left < 7:
                pos += left  # the block's tail is padding
                continue
            _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk = data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind == 0 and length == 0:
                continue
            partial = chunk if kind in (1, 2) else partial + chunk
            if kind in (1, 4):
                rec = pb.Record()
                rec.ParseFromString(partial)
                records.append((rec.WhichOneof("record_type"), rec))
                partial = b""
        run_id = next((r.run.run_id for k, r in records if k == "run"), None)
        out.append((run_id, records))
    return out


def wandb_history(run_dir):
    """{run id: [(step, {key: value})]} as W&B holds it once the offline files are synced, in order:
    a resumed run continues from its newest step, and W&B ignores a row whose step is below it
    (docs: "log a step lower than the current step ... W&B ignores the data")."""
    by_id = defaultdict(list)
    for run_id, records in wandb_records(run_dir):
        for kind, rec in records:
            if kind != "history":
                continue
            step = rec.history.step.num
            rows = by_id[run_id]
            if rows and step < rows[-1][0]:
                continue
            values = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            if rows and step == rows[-1][0]:
                rows[-1][1].update(values)  # the same step again: merged into its row
            else:
                rows.append((step, values))
    return dict(by_id)


def wandb_raw_steps(run_dir):
    """Every history step in the offline files, in order, before W&B's rule (duplicates included)."""
    return [rec.history.step.num for _, records in wandb_records(run_dir) for kind, rec in records if kind == "history"]


def tensorboard_scalars(log_dir, tag):
    """[(step, value)] as TensorBoard shows it (its reader applies the purge at each resume)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def tensorboard_raw_steps(log_dir, tag):
    """Every step written for `tag` in the event files, before any purge (duplicates included)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted(glob.glob(os.path.join(str(log_dir), "events.out.tfevents.*"))):
        for event in EventFileLoader(path).Load():
            for v in event.summary.value:
                if v.tag == tag:
                    steps.append(event.step)
    return steps


def mlflow_runs(tracking_uri, experiment):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])
