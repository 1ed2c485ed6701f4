"""Qdrant helpers, by their historical import path.

The code lives in two modules, one job each: ``collection.py`` reads a collection (its
layout, stored vectors, searches that return them) and ``provenance.py`` ties a collection to
the student that built it. Every name stays importable from here.
"""

from llama_index_d2llm.collection import (
    METADATA_KEY,
    CollectionInfo,
    MissingVectorError,
    StoredHit,
    UnsupportedVectorStoreError,
    adescribe_collection,
    afetch_vectors,
    alexical_scores,
    asearch_with_vectors,
    dense_vector,
    describe_collection,
    fetch_vectors,
    first_stage_of,
    lexical_scores,
    point_key,
    require_qdrant,
    search_with_vectors,
    sparse_query,
)
from llama_index_d2llm.provenance import (
    MATCH_THRESHOLD,
    VERIFY_SAMPLE,
    StudentGuard,
    acheck_student,
    arecord_student,
    check_node_vectors,
    check_student,
    record_student,
    student_record,
)

__all__ = [
    "MATCH_THRESHOLD",
    "METADATA_KEY",
    "VERIFY_SAMPLE",
    "CollectionInfo",
    "MissingVectorError",
    "StoredHit",
    "StudentGuard",
    "UnsupportedVectorStoreError",
    "acheck_student",
    "adescribe_collection",
    "afetch_vectors",
    "alexical_scores",
    "arecord_student",
    "asearch_with_vectors",
    "check_node_vectors",
    "check_student",
    "dense_vector",
    "describe_collection",
    "fetch_vectors",
    "first_stage_of",
    "lexical_scores",
    "point_key",
    "record_student",
    "require_qdrant",
    "search_with_vectors",
    "sparse_query",
    "student_record",
]
