"""`xc info`: a summary of an activation store."""


import click

from xcli import strict_json
from xcli.cli.params import common_options, storage_options
from xcli.files import read_path_argument


@click.command("info")
@common_options
@storage_options
@click.argument("store", metavar="STORE")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the summary.")
def command(store, as_json):
    """Summarise an activation store: sources, widths, tokens, dtype, size and completeness.

    STORE may be - to read the path from stdin, e.g. `xc harvest ... | xc info -`.
    """
    from xcli.data.store import open_store

    summary = open_store(read_path_argument(store)).summary()
    if as_json:
        click.echo(strict_json.dumps(summary))
        return
    state = "complete" if summary["complete"] else "INCOMPLETE (resume with xc harvest ... --resume)"
    click.echo(f"{summary['path']}: {summary['n_tokens']:,} tokens, {state}")
    click.echo(f"  dtype {summary['dtype']}, chunks of {summary['chunk_rows']} rows, codec {summary['codec']}, "
               f"{summary['bytes_on_disk'] / 1e6:,.1f} MB on disk")
    if summary["context_length"] or summary["dataset"]:
        click.echo(f"  context {summary['context_length']}, data {summary['dataset']}")
    width = max(len(s["name"]) for s in summary["sources"])
    click.echo(f"  {'source':<{width}}  {'model':<12} {'site':<12} {'layer':>5} {'d':>6}")
    for s in summary["sources"]:
        layer = "-" if s["layer"] is None else s["layer"]
        click.echo(f"  {s['name']:<{width}}  {s['model']:<12} {s['site']:<12} {layer:>5} {s['d']:>6}")
