"""The sample-set format: file names, manifest, blosc2 arrays, validation, and the dataset the trainer reads.

A sample set holds the replicas' label maps of a fold's training cases in nnU-Net's preprocessed grid, the K maps
of a case as one int8 ``(K, X, Y, Z)`` blosc2 array::

    $nnUNet_preprocessed/DatasetXXX_Name/varaug/<Plans>__<Config>__fold_F/
        <case>.b2nd        replica k's label map of <case> in channel k
        manifest.json      what made the set (replicas + checkpoint sha256s, plans, configuration, fold, cases,
                           shapes, file sha256s, sha256 of each case's preprocessed segmentation); written last

Arrays are chunked like nnU-Net's own segmentations (``comp_blosc2_params`` with the configuration's patch size),
one channel per chunk, so a patch-sized crop of one map decompresses only the chunks it touches. Every file is
written under a temporary name and renamed; the manifest is the only proof that a set is complete, and a file is
trusted only if its sha256 matches the manifest's.

The reading side is what ``<Base>_varaug`` trainers use inside ``nnUNetv2_train``: ``validate_sample_set``
(refuses a set that does not match plans, configuration, fold, case list or the preprocessed segmentations) and
``VariabilitySampleDataset``, a wrapper of the training dataset whose ``load_case`` returns the segmentation with
the K sample channels appended, lazily. The writer behind the ``samples`` command is :mod:`nnunet_varaug.inference.samples`;
this module imports no command module.
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_varaug.utilities.errors import VarAugError
from nnunet_varaug.utilities.fileio import file_sha256, replacing, write_json

MANIFEST = "manifest.json"
PARTIAL = "manifest.partial.json"
FORMAT_VERSION = 1
SAMPLE_DTYPE = np.int8
PARTIAL_SUFFIX = ".partial.b2nd"  # arrays being written; never trusted, removed by the next `samples` run


# ---- names and small helpers ------------------------------------------------------------------------------------
def sample_file(folder: str, case: str) -> str:
    return os.path.join(folder, f"{case}.b2nd")


def seg_digest(preprocessed_folder: str, case: str) -> Optional[str]:
    """sha256 of the case's preprocessed segmentation: a sample map is stale once the case was preprocessed again."""
    for name in (f"{case}_seg.b2nd", f"{case}_seg.npy", f"{case}.npz"):
        path = os.path.join(preprocessed_folder, name)
        if os.path.isfile(path):
            return file_sha256(path)
    return None


def read_manifest(folder: str, name: str = MANIFEST) -> Optional[dict]:
    """The manifest in ``folder`` or None if absent. Raises VarAugError if it is not a readable manifest."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise VarAugError(f"{path} is not a readable sample-set manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or "cases" not in manifest:
        raise VarAugError(f"{path} is not a sample-set manifest of format {FORMAT_VERSION}")
    return manifest


def manifest_fingerprint(folder: str) -> str:
    """sha256 of ``manifest.json``'s bytes: identifies a sample set (recorded by VarAug trainers)."""
    return file_sha256(os.path.join(folder, MANIFEST))


# ---- storage ----------------------------------------------------------------------------------------------------
def sample_chunking(shape: Sequence[int], patch_size: Sequence[int]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """blosc2 (blocks, chunks) for a ``(K, X, Y, Z)`` int8 array read in patch-sized crops.

    nnU-Net's own rule (``comp_blosc2_params`` with the patch size), one channel per chunk: training usually
    reads one replica's map per sample (``select_at_load``), and then decompresses only that map's chunks.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params

    return comp_blosc2_params(tuple(int(s) for s in shape), tuple(int(p) for p in patch_size),
                              bytes_per_pixel=np.dtype(SAMPLE_DTYPE).itemsize)


def save_sample_array(maps: np.ndarray, path: str, patch_size: Sequence[int]) -> str:
    """Write ``maps`` (K, X, Y, Z) int8 to ``path`` atomically; return the file's sha256."""
    import blosc2

    if maps.ndim != 4 or maps.dtype != SAMPLE_DTYPE:
        raise ValueError(f"sample maps must be int8 (K, X, Y, Z), got {maps.dtype} {maps.shape}")
    blocks, chunks = sample_chunking(maps.shape, patch_size)
    # LZ4HC without shuffle: label maps compress ~50x and decompress several times faster than with BITSHUFFLE
    cparams = {"codec": blosc2.Codec.LZ4HC, "clevel": 8, "filters": [blosc2.Filter.NOFILTER], "nthreads": 1}
    with replacing(path, PARTIAL_SUFFIX) as tmp:
        blosc2.asarray(np.ascontiguousarray(maps), urlpath=tmp, chunks=chunks, blocks=blocks, cparams=cparams)
        digest = file_sha256(tmp)
    return digest


def open_sample_array(path: str):
    """Open a sample array for reading without decompressing it (memory-mapped where possible)."""
    import blosc2

    kwargs = {} if os.name == "nt" else {"mmap_mode": "r"}
    return blosc2.open(urlpath=path, mode="r", dparams={"nthreads": 1}, **kwargs)


def read_sample_array(path: str) -> np.ndarray:
    """The whole ``(K, X, Y, Z)`` int8 array of one case."""
    return np.asarray(open_sample_array(path)[:])


# ---- reading side: validation and lazy crops ----------------------------------------------------------------------
def validate_sample_set(folder: str, *, plans: str, configuration: str, fold, cases: Sequence[str],
                        shapes: Dict[str, Tuple[int, ...]], fix: str, verify_files: bool = True,
                        preprocessed_folder: Optional[str] = None) -> dict:
    """Check a sample set against what a trainer will train on; return its manifest.

    Args:
        folder: the sample-set folder.
        plans, configuration, fold: the trainer's plans identifier, configuration and fold.
        cases: the fold's training cases.
        shapes: spatial shape of each training case in the preprocessed grid.
        fix: the command that (re)builds the set, quoted in every error.
        verify_files: also check each file's sha256 (catches corrupt and half-written files).
        preprocessed_folder: the preprocessed folder the trainer reads; where the manifest records the sha256 of a
            case's preprocessed segmentation (``seg_sha256``), the file there must still have it (a dataset
            preprocessed again, even to the same shapes, makes the maps stale).

    Raises:
        VarAugError: naming what does not match and ``fix``.
    """
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_path):
        state = ("an interrupted or unfinished `samples` run left no manifest" if os.path.isdir(folder)
                 else "the folder does not exist")
        raise VarAugError(f"no variability samples for {plans} {configuration} fold {fold} in {folder} ({state}): "
                          f"run `{fix}`")
    manifest = read_manifest(folder)
    for key, want in (("plans", plans), ("configuration", configuration), ("fold", str(fold))):
        if str(manifest.get(key)) != str(want):
            raise VarAugError(f"the sample set in {folder} was made for {key} '{manifest.get(key)}', not '{want}': "
                              f"rebuild it with `{fix}`")
    listed = set(manifest["cases"])
    missing = sorted(set(cases) - listed)
    extra = sorted(listed - set(cases))
    if missing or extra:
        what = []
        if missing:
            what.append(f"missing for {len(missing)} training case(s): {', '.join(missing[:5])}"
                        f"{' …' if len(missing) > 5 else ''}")
        if extra:
            what.append(f"made for {len(extra)} case(s) that are not training cases of fold {fold}: "
                        f"{', '.join(extra[:5])}{' …' if len(extra) > 5 else ''}")
        raise VarAugError(f"the sample set in {folder} does not match the case list of fold {fold} "
                          f"({'; '.join(what)}): update it with `{fix}`")
    for case in sorted(cases):
        check_case_entry(folder, case, manifest, shapes[case], fix, verify_files, preprocessed_folder)
    return manifest


def check_case_entry(folder: str, case: str, manifest: dict, shape: Sequence[int], fix: str, verify_files: bool,
                     preprocessed_folder: Optional[str]) -> None:
    """One case of a sample set: K maps of the preprocessed case's shape, the file present and intact, made from
    the preprocessed segmentation the trainer reads (else VarAugError quoting ``fix``)."""
    entry = manifest["cases"][case]
    want_shape = [int(manifest["num_replicas"]), *[int(s) for s in shape]]
    if list(entry["shape"]) != want_shape:
        raise VarAugError(f"variability samples of case {case} have shape {tuple(entry['shape'])}, but the "
                          f"preprocessed case needs {tuple(want_shape)} (was the dataset preprocessed again?): "
                          f"rebuild them with `{fix} --force`")
    path = sample_file(folder, case)
    if not os.path.isfile(path):
        raise VarAugError(f"variability samples of case {case} are missing ({path}): run `{fix}`")
    recorded = entry.get("seg_sha256")
    if preprocessed_folder is not None and recorded is not None and \
            seg_digest(preprocessed_folder, case) != recorded:
        raise VarAugError(f"variability samples of case {case} were made from another version of its "
                          f"preprocessed segmentation (the sha256 of {case}'s segmentation in "
                          f"{preprocessed_folder} differs from the manifest's: was the dataset preprocessed "
                          f"again?): rebuild them with `{fix}`")
    if verify_files and file_sha256(path) != entry["sha256"]:
        raise VarAugError(f"variability samples of case {case} are corrupt or not the ones the manifest lists "
                          f"({path}: sha256 differs): run `{fix}` to rewrite them")


class SegWithSamples:
    """The ground truth ``(1, X, Y, Z)`` and K sample maps ``(K, X, Y, Z)`` seen as one lazy array.

    With ``channel=None`` it is the ``(1 + K, X, Y, Z)`` stack (ground truth first); with ``channel=c`` it is the
    single map ``(1, X, Y, Z)`` of channel c of that stack (0: ground truth, k: replica k). Nothing is read until it
    is indexed; indexing reads only the requested region (for blosc2, only the chunks that region touches) and
    returns a numpy array. This is what nnU-Net's data loader needs: it crops with ``crop_and_pad_nd``, which takes
    ``.shape`` and one basic-slicing ``[...]``.
    """

    def __init__(self, seg, samples, channel: Optional[int] = None):
        k = int(samples.shape[0])
        if channel is not None and not 0 <= channel <= k:
            raise ValueError(f"channel {channel} is outside 0..{k}")
        self.seg = seg
        self.samples = samples
        self.channel = channel
        self.shape = (1 + k if channel is None else 1, *[int(s) for s in seg.shape[1:]])
        self.dtype = np.dtype(np.int16)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis or k is None for k in key) or len(key) > self.ndim:
            return np.asarray(self)[key]
        channel, spatial = key[0], tuple(key[1:])
        spatial = spatial + (slice(None),) * (self.ndim - 1 - len(spatial))
        if self.channel == 0:
            stack = np.asarray(self.seg[(slice(None), *spatial)]).astype(np.int16, copy=False)
        elif self.channel is not None:
            stack = np.asarray(self.samples[(slice(self.channel - 1, self.channel), *spatial)]).astype(np.int16)
        else:
            gt = np.asarray(self.seg[(slice(None), *spatial)])
            smp = np.asarray(self.samples[(slice(None), *spatial)])
            stack = np.empty((self.shape[0], *gt.shape[1:]), dtype=np.int16)
            stack[:1] = gt
            stack[1:] = smp
        return stack[channel]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        full = self[(slice(None),)]
        return full if dtype is None else full.astype(dtype, copy=False)


def _dataset_base():
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset

    return nnUNetBaseDataset


class VariabilitySampleDataset(_dataset_base()):
    """Wraps nnU-Net's training dataset so that ``load_case`` also serves the case's variability samples.

    Without ``chooser``, the segmentation is the lazy ``(1 + K, …)`` stack: ground truth and all K maps, moved
    together by the augmentation, one channel kept later by ``VariabilitySampleTransform``. With ``chooser`` (a
    ``VariabilitySampleTransform``), the choice is drawn here, per loaded case, and the segmentation is the one chosen
    map ``(1, …)``: only that map is read and augmented. Both give the same targets for the same choice, because
    nnU-Net's augmentation transforms every segmentation channel independently with the same parameters.

    Everything else (image, previous-stage segmentation, properties with class locations) is the wrapped
    dataset's, so patch sampling and foreground oversampling are unchanged. Picklable (augmentation workers).
    """

    def __init__(self, dataset, samples_folder: str, num_samples: int, fix: str = "", chooser=None):
        # no super().__init__: identifiers and folders are the wrapped dataset's
        self.dataset = dataset
        self.samples_folder = samples_folder
        self.num_samples = int(num_samples)
        self.fix = fix
        self.chooser = chooser
        self.source_folder = dataset.source_folder
        self.folder_with_segs_from_previous_stage = dataset.folder_with_segs_from_previous_stage
        self.identifiers = dataset.identifiers

    def __len__(self) -> int:
        return len(self.identifiers)

    def load_case(self, identifier):
        data, seg, seg_prev, properties = self.dataset.load_case(identifier)
        path = sample_file(self.samples_folder, identifier)
        try:
            samples = open_sample_array(path)
        except Exception as e:  # missing or unreadable: name the case and the fix
            raise VarAugError(f"cannot read the variability samples of case {identifier} ({path}: {e}); "
                              f"run `{self.fix}`") from None
        want = (self.num_samples, *[int(s) for s in seg.shape[1:]])
        if tuple(samples.shape) != want:
            raise VarAugError(f"variability samples of case {identifier} have shape {tuple(samples.shape)}, "
                              f"expected {want}: rebuild them with `{self.fix} --force`")
        channel = None if self.chooser is None else self.chooser.get_parameters()["channel"]
        return data, SegWithSamples(seg, samples, channel), seg_prev, properties

    @staticmethod
    def save_case(data, seg, properties, output_filename_truncated):
        raise NotImplementedError("VariabilitySampleDataset is read-only")

    @staticmethod
    def get_identifiers(folder: str) -> List[str]:
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        return infer_dataset_class(folder).get_identifiers(folder)


# ---- writing the format ----------------------------------------------------------------------------------------
def sample_set_identity(dataset: str, plans: str, configuration: str, fold, replicas: List[dict],
                        tta: bool, replicas_by_fold: Optional[Dict[str, List[dict]]] = None) -> dict:
    """What determines the content of a sample set: two runs with equal identity write equal files.

    ``replicas`` lists ``{"name", "checkpoint", "sha256"}`` per replica, in channel order. An out-of-fold set
    (``fold`` = ``"out-of-fold"``) also gives ``replicas_by_fold``: those records for each fold's replicas.
    """
    identity = {"format": FORMAT_VERSION, "dataset": dataset, "plans": plans, "configuration": configuration,
                "fold": str(fold), "replicas": list(replicas), "tta": bool(tta)}
    if replicas_by_fold is not None:
        identity.update({"source": "out-of-fold", "replicas_by_fold": dict(replicas_by_fold),
                         "num_folds": len(replicas_by_fold)})
    return identity


def build_manifest(identity: dict, cases: Dict[str, dict], *, base: str, kind: str, start: int,
                   patch_size: Sequence[int], ignore_label: Optional[int], regions: bool, command: str) -> dict:
    """A complete manifest: ``identity`` (:func:`sample_set_identity`) plus the case entries ``{case: {shape, sha256,
    bytes}}`` and what the reading side and the error messages need."""
    from importlib.metadata import version

    shapes = {tuple(e["shape"])[0] for e in cases.values()}
    if len(shapes) > 1:
        raise ValueError(f"sample arrays disagree on K: {sorted(shapes)}")
    return {"source": "in-fold", **identity, "num_replicas": len(identity["replicas"]), "base": base, "kind": kind,
            "start": int(start),
            "dtype": np.dtype(SAMPLE_DTYPE).name, "patch_size": [int(p) for p in patch_size],
            "case_list": sorted(cases), "cases": {c: cases[c] for c in sorted(cases)},
            "ignore_label": ignore_label, "regions": bool(regions), "command": command,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "nnunetv2_version": version("nnunetv2"), "nnunet_varaug_version": version("nnunet-varaug")}


def save_manifest(folder: str, manifest: dict) -> None:
    """Write ``manifest.json`` atomically: the last step of building a sample set."""
    write_json(os.path.join(folder, MANIFEST), manifest, indent=1)


def write_case(folder: str, case: str, maps: np.ndarray, patch_size: Sequence[int],
               seg_sha256: Optional[str] = None, **extra) -> dict:
    """Store one case's ``(K, X, Y, Z)`` maps (int8) and return its manifest entry (``shape``, ``sha256``,
    ``bytes``, ``seg_sha256`` when known, and ``extra`` fields such as an out-of-fold set's ``fold``)."""
    path = sample_file(folder, case)
    digest = save_sample_array(np.asarray(maps).astype(SAMPLE_DTYPE, copy=False), path, patch_size)
    entry = {"shape": [int(s) for s in np.shape(maps)], "sha256": digest, "bytes": os.path.getsize(path)}
    if seg_sha256 is not None:  # ties the maps to the segmentation they were made from
        entry["seg_sha256"] = seg_sha256
    entry.update(extra)
    return entry


def finish_set(folder: str, identity: dict, entries: Dict[str, dict], **manifest_fields) -> dict:
    """The last steps of writing a set: arrays of cases no longer in it removed, the manifest written (atomically,
    last), the partial record removed. ``manifest_fields``: :func:`build_manifest`'s keywords."""
    for f in os.listdir(folder):
        if f.endswith(".b2nd") and f[:-len(".b2nd")] not in entries:
            os.remove(os.path.join(folder, f))
    manifest = build_manifest(identity, entries, **manifest_fields)
    save_manifest(folder, manifest)
    if os.path.isfile(os.path.join(folder, PARTIAL)):
        os.remove(os.path.join(folder, PARTIAL))
    return manifest


def write_sample_set(folder: str, maps: Dict[str, np.ndarray], *, dataset: str, plans: str, configuration: str,
                     fold, replica_names: Sequence[str], patch_size: Sequence[int], ignore_label: Optional[int] = None,
                     regions: bool = False, base: str = "nnUNetTrainer", kind: str = "seed", command: str = "",
                     preprocessed_folder: Optional[str] = None) -> dict:
    """Store label maps made elsewhere as a sample set (arrays first, manifest last) and return the manifest.

    ``maps[case]`` is int8 ``(K, X, Y, Z)`` in the preprocessed grid of ``case``, channel k from
    ``replica_names[k]``. Used by tests (maps that are known functions of the ground truth) and by anyone whose
    replicas were not trained by nnunet_varaug. With ``preprocessed_folder``, each case also records the sha256
    of its preprocessed segmentation there, which trainers check (``validate_sample_set``).
    """
    os.makedirs(folder, exist_ok=True)
    manifest_path = os.path.join(folder, MANIFEST)
    if os.path.isfile(manifest_path):
        os.remove(manifest_path)
    entries = {}
    for case in sorted(maps):
        if np.shape(maps[case])[0] != len(replica_names):
            raise ValueError(f"{case}: {np.shape(maps[case])[0]} maps for {len(replica_names)} replica names")
        digest = None if preprocessed_folder is None else seg_digest(preprocessed_folder, case)
        entries[case] = write_case(folder, case, maps[case], patch_size, digest)
    identity = sample_set_identity(dataset, plans, configuration, fold,
                                   [{"name": n, "checkpoint": None, "sha256": None} for n in replica_names], False)
    return finish_set(folder, identity, entries, base=base, kind=kind, start=0, patch_size=patch_size,
                      ignore_label=ignore_label, regions=regions, command=command)
