"""What every trial of a sweep is handed besides its config: where it logs, and which caches of its node it reads.

The driver builds one :class:`TrialContext` per sweep; each stage hands Tune its copy (``tune.with_parameters``),
which Ray pickles once into its object store for every worker. It holds plain values only (no client, no open file),
so it pickles by value and never carries a credential: workers get those from their own environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from lasegseg.data.pseudonym import Pseudonymizer
from lasegseg.sweep.study_table import StudyTable

Stage = Literal["trial", "screen"]
"""A trial's role: ``trial`` (the seeded grid) or ``screen`` (learning-rate screening), its MLflow run's tag."""


@dataclass(frozen=True)
class TrialContext:
    """The sweep's side of one trial, the same for every trial of a stage.

    Args:
        tracking_uri: the MLflow store every trial logs to.
        experiment_id, parent_run_id: the sweep's experiment and parent run.
        table: the study's trials: a Tune trial's config names its row (:mod:`lasegseg.sweep.study_table`).
        threads: torch's intra-op threads per trial (0 leaves torch's default).
        cache_paths: ``{preprocessing key: folder}`` of the slice caches the driver opened (see
            :func:`lasegseg.sweep.caches.preprocessing_key`).
        feature_paths: ``{node id: {feature slot: folder}}`` of the feature caches each node's cache task built.
        feature_readers: ``{feature slot: decoders}``: the decoders of the sweep's trials that read each cache.
        feature_index: a local sweep's feature index folder (:func:`lasegseg.sweep.caches.publish_features`); empty
            on a cluster.
        pseudonym_salt: the sweep's salt with ``--pseudonymize``, else empty.
        case_ids: the dataset's case ids, whose aliases a pseudonymised trial writes instead.
    """

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    table: StudyTable | None = None
    threads: int = 0
    cache_paths: Mapping[str, str] = field(default_factory=dict)
    feature_paths: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    feature_readers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    feature_index: str = ""
    pseudonym_salt: str = ""
    case_ids: tuple[str, ...] = ()

    def alias(self) -> Pseudonymizer | None:
        """The sweep's pseudonymiser (``--pseudonymize``), else None."""
        if not self.pseudonym_salt:
            return None
        return Pseudonymizer(self.pseudonym_salt.encode("utf-8"), self.case_ids)

    def feature_path(self, node_id: str, slot: str) -> str | None:
        """The folder of ``slot``'s features that the cache task of node ``node_id`` built, None when it built none."""
        return self.feature_paths.get(node_id, {}).get(slot)
