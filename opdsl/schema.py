"""JSON Schema of the spec file format, for editors' YAML completion (``opdsl schema``).

Generated from the models, and as strict as JSON Schema allows about what the loader enforces: the format
version, the name pattern, the graph layout (``nodes`` + ``output``, and/or named ``graphs``), the
ranges of literal block fields and the shape of hyperparameter values. What it cannot say (graph
structure, ``$hyper`` references, ranges of expressions) is left to ``opdsl validate``.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import ConfigDict, Field, create_model

from opdsl.blocks import BLOCKS
from opdsl.spec import MAIN_GRAPH, SPEC_VERSION, GraphSpec, Requirement, Route, Spec

__all__ = ["spec_json_schema"]


def spec_json_schema() -> dict[str, Any]:
    classes = tuple(dict.fromkeys(cls for family in BLOCKS.values() for cls in family.values()))
    node = Union[classes]  # type: ignore[valid-type]
    nodes = (dict[str, node], Field(min_length=1, description="node name -> block"))
    output = (str, Field(description="the node whose value updates the parameters"))
    config = ConfigDict(extra="forbid")
    output_is = (GraphSpec.model_fields["output_is"].annotation, GraphSpec.model_fields["output_is"])
    graph = create_model("Graph", __config__=config, nodes=nodes, output=output, output_is=output_is)
    fields = Spec.model_fields
    spec_file = create_model(
        "OpdslSpec",
        __config__=config,
        opdsl=(Literal[SPEC_VERSION], Field(description=f"format version; must be {SPEC_VERSION}")),
        name=(str, fields["name"]),
        summary=(str, fields["summary"]),
        paper=(Union[str, None], fields["paper"]),
        notes=(Union[str, None], fields["notes"]),
        hyper=(fields["hyper"].annotation, fields["hyper"]),
        nodes=(dict[str, node], Field(None, min_length=1, description="the top-level graph's nodes")),
        output=(str, Field(None, description="the top-level graph's output node")),
        output_is=output_is,
        graphs=(dict[str, graph], Field(default_factory=dict, description="more named graphs, for `groups`")),
        groups=(list[Route], Field(default_factory=list)),
        require=(list[Requirement], Field(default_factory=list, description="conditions every group's values meet")),
    )
    schema = spec_file.model_json_schema(by_alias=True)
    # The loader's rules on the graph layout: `nodes` and `output` come together (the top-level graph),
    # a spec without them has named `graphs` instead, and `main` is the top-level graph's reserved name.
    schema["dependentRequired"] = {"nodes": ["output"], "output": ["nodes"], "output_is": ["nodes"]}
    schema["anyOf"] = [{"required": ["nodes"]}, {"required": ["graphs"]}]
    for key in ("nodes", "output"):
        del schema["properties"][key]["default"]  # absent, never null
    schema["properties"]["graphs"]["propertyNames"] = {"not": {"const": MAIN_GRAPH}}
    # a route takes `graph` or `use`, not both
    both = {key: {"type": "string"} for key in ("graph", "use")}
    schema["$defs"]["Route"]["not"] = {"required": list(both), "properties": both}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"opdsl optimizer spec (format {SPEC_VERSION})"
    return schema
