"""xc export: a crosscoder's features for the tools that show or load them.

    from xcli.export import ExportConfig, export
    export(ExportConfig(checkpoint="xc.safetensors", store="acts.zarr", output="np-export"))  # -> Path

config.py declares the options; common.py holds what every format shares (manifest,
inputs, slices); neuronpedia.py writes Neuronpedia's v1 layout (neuronpedia_schema.py:
the layout, the importer's rules and `check_export`; dashboards.py: the statistics);
saelens.py writes one SAELens SAE per source slice; circuit_tracer.py writes per-layer transcoders
as a circuit-tracer transcoder set.
"""

from pathlib import Path

from xcli.export.config import FORMATS, ExportConfig
from xcli.files import check_replaceable, output_lock


def export(config: ExportConfig) -> Path:
    """Write the export at config.output in config.format (one writer at a time); returns the folder."""
    # The writers import torch; `xc --help` imports only the config.
    with output_lock(config.output):
        if config.overwrite:  # before any work: replace only an xc export that holds no input of this one
            from xcli.export.common import export_inputs

            check_replaceable(config.output, "export", export_inputs(config))
        if config.format == "circuit-tracer":
            from xcli.export.circuit_tracer import export_circuit_tracer

            return export_circuit_tracer(config)
        if config.format == "saelens":
            from xcli.export.saelens import export_saelens

            return export_saelens(config)
        from xcli.export.neuronpedia import export_neuronpedia

        return export_neuronpedia(config)


__all__ = ["FORMATS", "ExportConfig", "export"]
