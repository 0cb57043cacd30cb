"""What the tfds builders share: config naming, metadata tables, skip accounting, progress, prepare + open.

tensorflow-datasets runs here without TensorFlow: builders write array_record files and are read back as random
access data sources (`as_data_source`), never through `as_dataset`. Only `Tensor`, `Text` and `Scalar` features are
used (`Image`/`Video` features need TensorFlow).
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

FILE_FORMAT = "array_record"
PREPARE_REPORT = "prepare_report.json"


class _QuietCustomConfig(logging.Filter):
    # Every builder here takes a custom config by design; tfds warns about each one.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Using custom data configuration" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietCustomConfig())


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """The `DatasetInfo` of this package's builders (return it from `_info`).

    tfds asks its public GCS bucket for the metadata of every dataset it has not prepared yet, and for that makes a
    temporary directory it never removes, even when the bucket is disabled: an empty /tmp/tmp*tfds per builder
    constructed. Local datasets are never in that bucket, so the lookup is skipped."""

    def initialize_from_bucket(self) -> None:
        return None


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of this package's builders: local files only, prepared with `prepare`.

    tfds looks for a checksums file beside a builder's module through `importlib_resources`, a package this
    project does not install; these builders download nothing, so they have no code path to search.
    """

    code_path = None
    skip_reports: dict[str, dict[str, Any]]

    def _finish_split(self, counter: "SkipCounter", split: str) -> None:
        """Records and prints a split's skip summary; call once the split's last row is read."""
        if not hasattr(self, "skip_reports"):
            self.skip_reports = {}
        self.skip_reports[split] = counter.as_dict()
        print(counter.summary(), file=sys.stderr, flush=True)
        if counter.kept == 0:
            raise ValueError(
                f"every row of split {split!r} was skipped, so there is nothing to write:\n{counter.summary()}\n"
                "Check that the file folder matches the paths in the table and the size/length limits."
            )


class TableBuilder(LocalBuilder, skip_registration=True):
    """A builder over a metadata table (train, optionally validation) and a folder of files, one row per example.

    Subclasses name their table fields in TABLE_FIELDS and give `_rows(table)` (rows of a table, after checking its
    header) and `_load(path)` (one file -> record fields, or raise Skip).
    """

    TABLE_FIELDS: tuple[str, str] = ("table", "validation_table")

    def _check_config(self) -> None:
        """Raises on settings that cannot work, before any file is read."""

    @abc.abstractmethod
    def _rows(self, table: str) -> Iterator["Row"]:
        """Rows of a metadata table, after checking its header."""

    @abc.abstractmethod
    def _load(self, path: Path) -> dict[str, Any]:
        """One file -> the record's fields, or raise Skip."""

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        c = self.builder_config
        train_field, validation_field = self.TABLE_FIELDS
        if not getattr(c, train_field):
            raise ValueError(f"{self.name} needs {train_field}=PATH, the metadata table (CSV or parquet) of its rows")
        self._check_config()
        tables = {"train": getattr(c, train_field), "validation": getattr(c, validation_field)}
        # Open every table first so a bad header fails before any file is decoded.
        opened = {split: self._rows(path) for split, path in tables.items() if path}
        return {split: self._generate_examples(split, rows) for split, rows in opened.items()}

    def _generate_examples(self, split: str, rows: Iterable["Row"]):
        counter = SkipCounter(f"{self.name}/{self.builder_config.name}/{split}")
        yield from load_rows(rows, self._load, counter, num_workers=self.builder_config.num_workers)
        self._finish_split(counter, split)


def config_name(prefix: str, params: dict[str, Any]) -> str:
    """A tfds config name: readable prefix + digest of every parameter, so a changed setting never reuses old files."""
    digest = hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{prefix}-{digest}"


def config_params(config: tfds.core.BuilderConfig) -> dict[str, Any]:
    """The fields a subclass of BuilderConfig adds (tfds' own name/version/... fields left out)."""
    base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in base}


def make_builder(
    cls: type[tfds.core.DatasetBuilder],
    config: tfds.core.BuilderConfig,
    prefix: str,
    data_dir: str | None,
    ignore: Sequence[str] = (),
) -> Any:
    """Instantiates `cls` with `config` renamed to prefix + digest of the fields that shape the stored data.

    `ignore` lists fields that do not (e.g. decode threads, or frame size when bytes are stored as they are).
    """
    identity = {k: v for k, v in config_params(config).items() if k not in {"num_workers", *ignore}}
    return cls(
        data_dir=data_dir,
        config=dataclasses.replace(config, name=config_name(prefix, identity)),
        file_format=FILE_FORMAT,
    )


def raw_tensor(shape: tuple[int | None, ...], dtype: Any = np.uint8) -> tfds.features.Tensor:
    """An array feature stored as raw bytes: tfds' default encoding writes one varint/float per value, which makes
    a 320x512 video record ~10x slower to read."""
    return tfds.features.Tensor(shape=shape, dtype=dtype, encoding=tfds.features.Encoding.BYTES)


def video_features(storage: str, height: int, width: int) -> dict[str, tfds.features.FeatureConnector]:
    """Record fields of every video dataset: `frames` uint8 [F, H, W, 3] ('frames' storage) or `mp4` bytes."""
    common = {
        "id": tfds.features.Text(),
        "caption": tfds.features.Text(),
        "num_frames": tfds.features.Scalar(np.int32),
        "fps": tfds.features.Scalar(np.float32),
    }
    if storage == "frames":
        return {**common, "frames": raw_tensor((None, height, width, 3))}
    if storage == "mp4":
        return {**common, "mp4": tfds.features.Tensor(shape=(), dtype=np.object_)}
    raise ValueError(f"video storage must be 'frames' (decoded uint8) or 'mp4' (encoded bytes), got {storage!r}")


class SkipCounter:
    """Counts rows dropped during a prepare run by reason, keeping a few examples of each for the summary."""

    def __init__(self, name: str, examples_per_reason: int = 3):
        self.name = name
        self.kept = 0
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self._per_reason = examples_per_reason

    def skip(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < self._per_reason:
            self.examples[reason].append(detail)

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.name,
            "kept": self.kept,
            "skipped": self.skipped,
            "by_reason": dict(self.counts),
            "examples": dict(self.examples),
        }

    def summary(self) -> str:
        lines = [f"[{self.name}] prepare done: kept {self.kept}, skipped {self.skipped}"]
        for reason, n in self.counts.most_common():
            lines.append(f"  {reason}: {n}  e.g. " + "; ".join(self.examples[reason]))
        return "\n".join(lines)


class Progress:
    """Prints `rows read / kept / skipped` to stderr every `every_s` seconds of a long prepare run."""

    def __init__(self, counter: SkipCounter, every_s: float = 30.0):
        self.counter, self.every_s = counter, every_s
        self.rows = 0
        self._start = self._last = time.monotonic()

    def tick(self) -> None:
        self.rows += 1
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            rate = self.rows / max(now - self._start, 1e-9)
            print(
                f"[{self.counter.name}] {self.rows} rows read, {self.counter.kept} kept, {self.counter.skipped} skipped "
                f"({rate:.1f} rows/s)",
                file=sys.stderr,
                flush=True,
            )


def read_table(path: str | Path) -> tuple[list[str], Iterator[dict[str, Any]]]:
    """Opens a CSV or parquet metadata table without loading it: (column names, iterator over row dicts)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata table {path} does not exist; pass the path of the CSV/parquet file")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq  # a tensorflow-datasets dependency

        table = pq.ParquetFile(path)
        columns = list(table.schema_arrow.names)

        def parquet_rows() -> Iterator[dict[str, Any]]:
            for batch in table.iter_batches(batch_size=4096):
                yield from batch.to_pylist()

        return columns, parquet_rows()
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])

    def csv_rows() -> Iterator[dict[str, Any]]:
        with open(path, newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f)

    return [c.strip() for c in header], csv_rows()


def pick_column(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    """The first of `candidates` present in `columns`, or None."""
    return next((c for c in candidates if c in columns), None)


def require_columns(path: str | Path, columns: Sequence[str], needs: dict[str, Sequence[str]]) -> dict[str, str]:
    """Maps each needed role to a present column, or fails at once naming what is missing and what was found.

    needs: role -> accepted column names, e.g. {'caption': ('name', 'caption')}.
    """
    found, missing = {}, []
    for role, candidates in needs.items():
        column = pick_column(columns, candidates)
        if column is None:
            missing.append(f"{role} (one of {', '.join(candidates)})")
        else:
            found[role] = column
    if missing:
        raise ValueError(
            f'malformed header in {path}: missing column for {"; ".join(missing)}. Columns found: '
            f"{list(columns)}. Fix the header row (first line of a CSV) or rename the columns."
        )
    return found


class Skip(Exception):
    """Raised by a row loader to drop the row; `reason` is the summary's category."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class Row:
    """One metadata row reduced to what every builder needs."""

    index: int
    id: str
    caption: str
    path: Path


def load_rows(
    rows: Iterable[Row],
    load: Callable[[Path], dict[str, Any]],
    counter: SkipCounter,
    num_workers: int = 4,
    window: int = 64,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (key, record) for good rows in table order; counts and drops the bad ones, never raises for them.

    `load(path)` decodes one file into record fields or raises Skip. Rows are loaded `num_workers` at a time in
    threads (ffmpeg and pillow do their work outside the GIL), at most `window` rows ahead of the writer.
    """
    progress = Progress(counter)

    def checked(row: Row) -> dict[str, Any]:
        if not row.caption.strip():
            raise Skip("empty_caption", f"row {row.index} ({row.id})")
        if not row.path.is_file():
            raise Skip("missing_file", str(row.path))
        return load(row.path)

    def run(row: Row) -> tuple[Row, dict[str, Any] | Skip]:
        try:
            return row, checked(row)
        except Skip as e:
            return row, e
        except Exception as e:  # pylint: disable=broad-except
            # One bad file must never end a run over millions of rows: count it with the reason python gave.
            return row, Skip("unreadable", f"{row.path}: {type(e).__name__}: {e}")

    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
        pending: collections.deque = collections.deque()
        rows = iter(rows)
        while True:
            while len(pending) < window and (row := next(rows, None)) is not None:
                pending.append(pool.submit(run, row))
            if not pending:
                break
            row, result = pending.popleft().result()
            progress.tick()
            if isinstance(result, Skip):
                counter.skip(result.reason, result.detail)
                continue
            counter.kept += 1
            yield row.index, {"id": row.id, "caption": row.caption.strip(), **result}


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    return (Path(builder.data_dir) / "dataset_info.json").is_file()


def prepare(builder: tfds.core.DatasetBuilder) -> dict[str, Any] | None:
    """Builds the dataset if it is not on disk yet, prints the skip summary and saves it as prepare_report.json.

    Returns the report (None when the dataset was already prepared and has no report).
    """
    report_path = Path(builder.data_dir) / PREPARE_REPORT
    if not is_prepared(builder):
        with contextlib.redirect_stdout(sys.stderr):  # tfds' chatter joins the progress lines, off stdout
            builder.download_and_prepare(
                file_format=FILE_FORMAT, download_config=tfds.download.DownloadConfig(try_download_gcs=False)
            )
        reports = getattr(builder, "skip_reports", {})
        if reports:
            report_path.write_text(json.dumps(reports, indent=1))
    return json.loads(report_path.read_text()) if report_path.is_file() else None


def split_sources(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
    """Random access sources per split (`len(src)`, `src[i]` -> dict of numpy arrays, bytes and ints)."""
    return dict(builder.as_data_source())


def decode_text(value: Any) -> str:
    """tfds `Text` fields come back from a data source as bytes."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
