"""Reference pages generated from the code at every build (mkdocs-gen-files): they cannot go stale."""

import click
import mkdocs_gen_files
import typer
import typer.core

from stainmil.cli import app
from stainmil.config import config_reference_markdown
from stainmil.features.encoders import encoder_table
from stainmil.model.registry import ARCHITECTURES
from stainmil.tables import render_table

with mkdocs_gen_files.open("reference/encoders.md", "w") as page:
    page.write("# Encoder reference\n\nGenerated from `stainmil.features.encoders` (what `stainmil backbones --wide` "
               "prints). How to choose and where the weights come from: [Encoders](../encoders.md).\n\n")
    page.write(render_table(encoder_table(), fmt="markdown"))

with mkdocs_gen_files.open("reference/architectures.md", "w") as page:
    page.write("# Architecture reference\n\nGenerated from `stainmil.model.registry` (`stainmil models`); "
               "`model.architecture: NAME` picks one. How they compare: [Baselines](../baselines.md).\n\n")
    rows = [{"name": f"`{name}`", "patch attention": "yes" if spec.patch_attention else "no",
             "reference": spec.reference} for name, spec in ARCHITECTURES.items()]
    page.write(render_table(rows, fmt="markdown"))

with mkdocs_gen_files.open("reference/configuration.md", "w") as page:
    page.write("# Configuration reference\n\nGenerated from the dataclasses in `src/stainmil/config.py` "
               "(`stainmil config --reference` prints it). Set any key in a YAML file or with "
               "`--set key=value`.\n\n")
    page.write(config_reference_markdown())

typer.core.HAS_RICH = False  # plain click help text, not rich's boxes
command = typer.main.get_command(app)
with mkdocs_gen_files.open("reference/cli.md", "w") as page:
    page.write("# Command reference\n\nGenerated from the CLI (`stainmil COMMAND --help`).\n\n")
    root = click.Context(command, info_name="stainmil")
    for name in sorted(command.list_commands(root)):
        sub = command.get_command(root, name)
        with click.Context(sub, info_name=f"stainmil {name}", parent=root, terminal_width=100) as ctx:
            page.write(f"## `stainmil {name}`\n\n```text\n{sub.get_help(ctx)}\n```\n\n")
