"""qdrant-client's request models -> Qdrant Edge's, for the calls ``EdgeClient`` answers.

Why a translation and not a second code path: ``QdrantVectorStore`` and this package build
their filters, queries and points with ``qdrant_client.models``; translating them at the one
boundary keeps every caller identical for the embedded store and for a server. Only the
shapes those callers produce are translated; anything else is refused by name, so a gap shows
as an error and never as a silently different search.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import qdrant_edge as edge
from qdrant_client import models

from llama_index_d2llm.student.errors import D2LLMError


class UnsupportedRequestError(D2LLMError, NotImplementedError):
    """A request the embedded (Qdrant Edge) store does not translate."""


def _unsupported(what: Any, where: str) -> UnsupportedRequestError:
    return UnsupportedRequestError(
        f"the embedded Qdrant store (Qdrant Edge) does not support {type(what).__name__} in "
        f"{where}: use a filter/query of the kinds MetadataFilters produce, or a Qdrant server "
        "(D2LLMVectorStore(..., client=QdrantClient(url=...)))")


def point_id(value: Any) -> int | str:
    """A point id as Edge takes it (an unsigned integer or a UUID text)."""
    return value if isinstance(value, int) else str(value)


DISTANCES = {"Dot": edge.Distance.Dot, "Cosine": edge.Distance.Cosine,
             "Euclid": edge.Distance.Euclid, "Manhattan": edge.Distance.Manhattan}


# ---------------------------------------------------------------------------- vectors
def vector(value: Any) -> Any:
    """A dense list, a ``SparseVector`` or a dict of them (named vectors)."""
    if isinstance(value, dict):
        return {name: vector(v) for name, v in value.items()}
    if isinstance(value, models.SparseVector):
        return edge.SparseVector(list(value.indices), [float(v) for v in value.values])
    if hasattr(value, "tolist"):
        return value.tolist()
    return list(value)


def points(structs: Iterable[Any]) -> list[Any]:
    """``PointStruct``s -> Edge ``Point``s."""
    return [edge.Point(point_id(p.id), vector(p.vector), p.payload or {}) for p in structs]


def with_vectors(value: Any) -> bool | list[str]:
    return list(value) if isinstance(value, list | tuple) else bool(value)


def with_payload(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return bool(value if value is not None else True)
    raise _unsupported(value, "with_payload")


# ---------------------------------------------------------------------------- filters
def _match(match: Any) -> Any:
    if isinstance(match, models.MatchValue):
        return edge.MatchValue(match.value)
    if isinstance(match, models.MatchAny):
        return edge.MatchAny(list(match.any))
    if isinstance(match, models.MatchExcept):
        return edge.MatchExcept(list(getattr(match, "except_", None) or []))
    if isinstance(match, models.MatchText):
        return edge.MatchText(match.text)
    if isinstance(match, models.MatchTextAny):
        return edge.MatchTextAny(match.text_any)
    raise _unsupported(match, "a filter's match")


def _range(value: Any) -> Any:
    if isinstance(value, models.Range):
        return edge.RangeFloat(gte=value.gte, gt=value.gt, lte=value.lte, lt=value.lt)
    raise _unsupported(value, "a filter's range")


def condition(cond: Any) -> Any:
    """One filter condition."""
    if isinstance(cond, models.Filter):
        return query_filter(cond)
    if isinstance(cond, models.FieldCondition):
        if cond.geo_bounding_box or cond.geo_radius or cond.geo_polygon or cond.values_count:
            raise _unsupported(cond, "a geo or values-count field condition")
        return edge.FieldCondition(
            cond.key, match=None if cond.match is None else _match(cond.match),
            range=None if cond.range is None else _range(cond.range),
            is_empty=cond.is_empty, is_null=cond.is_null)
    if isinstance(cond, models.IsEmptyCondition):
        return edge.IsEmptyCondition(cond.is_empty.key)
    if isinstance(cond, models.IsNullCondition):
        return edge.IsNullCondition(cond.is_null.key)
    if isinstance(cond, models.HasIdCondition):
        return edge.HasIdCondition({point_id(i) for i in cond.has_id})
    if isinstance(cond, models.NestedCondition):
        return edge.NestedCondition(cond.nested.key, query_filter(cond.nested.filter))
    raise _unsupported(cond, "a filter")


def _conditions(conds: Sequence[Any] | Any | None) -> list[Any] | None:
    if conds is None:
        return None
    if not isinstance(conds, list | tuple):
        conds = [conds]
    return [condition(c) for c in conds] or None


def query_filter(value: Any) -> Any:
    """A ``models.Filter`` (or ``None``)."""
    if value is None:
        return None
    if not isinstance(value, models.Filter):
        raise _unsupported(value, "query_filter")
    min_should = None
    if value.min_should is not None:
        min_should = edge.MinShould(_conditions(value.min_should.conditions) or [],
                                    value.min_should.min_count)
    return edge.Filter(must=_conditions(value.must), should=_conditions(value.should),
                       must_not=_conditions(value.must_not), min_should=min_should)


# ---------------------------------------------------------------------------- queries
def scoring_query(value: Any, using: str | None) -> Any:
    """A query of ``query_points``: a vector (dense or sparse), nearest, or RRF fusion."""
    if value is None:
        return None
    if isinstance(value, models.NearestQuery):
        value = value.nearest
    if isinstance(value, models.RrfQuery):
        return edge.Fusion.Rrf(k=value.rrf.k if value.rrf.k is not None else 60,
                               weights=value.rrf.weights)
    if isinstance(value, models.FusionQuery):
        if value.fusion == models.Fusion.RRF:
            return edge.Fusion.Rrf(k=60)
        return edge.Fusion.Dbsf()
    if isinstance(value, models.SparseVector) or (
            isinstance(value, Sequence) and not isinstance(value, str)) or hasattr(
            value, "tolist"):
        return edge.Query.Nearest(vector(value), using=using or "")
    raise _unsupported(value, "query")


def search_params(value: Any) -> Any:
    if value is None:
        return None
    return edge.SearchParams(hnsw_ef=value.hnsw_ef, exact=bool(value.exact))


def prefetch(value: Any) -> Any:
    return edge.Prefetch(limit=value.limit or 10, query=scoring_query(value.query, value.using),
                         prefetches=[prefetch(p) for p in _as_list(value.prefetch)] or None,
                         params=search_params(value.params),
                         filter=query_filter(value.filter),
                         score_threshold=value.score_threshold)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def query_request(*, query: Any = None, using: str | None = None, prefetch_: Any = None,
                  query_filter_: Any = None, limit: int = 10, offset: int | None = None,
                  with_payload_: Any = True, with_vectors_: Any = False,
                  search_params_: Any = None, score_threshold: float | None = None) -> Any:
    """An Edge ``QueryRequest`` from ``query_points``' arguments."""
    return edge.QueryRequest(
        limit=limit, offset=offset, query=scoring_query(query, using),
        prefetches=[prefetch(p) for p in _as_list(prefetch_)] or None,
        with_vector=with_vectors(with_vectors_), with_payload=with_payload(with_payload_),
        filter=query_filter(query_filter_), score_threshold=score_threshold,
        params=search_params(search_params_))
