"""JSON Schema of the spec file format, for editors' YAML completion (``opdsl schema``)."""
from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import ConfigDict, Field, create_model

from opdsl.blocks import BLOCKS
from opdsl.spec import HyperValue, Route

__all__ = ["spec_json_schema"]


def spec_json_schema() -> dict[str, Any]:
    classes = tuple(dict.fromkeys(cls for family in BLOCKS.values() for cls in family.values()))
    node = Union[classes]  # type: ignore[valid-type]
    config = ConfigDict(extra="forbid")
    graph = create_model("Graph", __config__=config, nodes=(dict[str, node], ...), output=(str, ...))
    spec_file = create_model(
        "OpdslSpec",
        __config__=config,
        opdsl=(int, Field(1, description="format version")),
        name=(str, ...),
        summary=(str, ""),
        paper=(Optional[str], None),
        notes=(Optional[str], None),
        hyper=(dict[str, HyperValue], Field(default_factory=dict)),
        nodes=(dict[str, node], Field(default_factory=dict)),
        output=(Optional[str], None),
        graphs=(dict[str, graph], Field(default_factory=dict)),
        groups=(list[Route], Field(default_factory=list)),
    )
    schema = spec_file.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "opdsl optimizer spec (format 1)"
    return schema
