"""Reference pages generated from the code at every build (mkdocs-gen-files): they cannot go stale."""

import mkdocs_gen_files
import typer

from stainmil.cli import app
from stainmil.config import config_reference_markdown
from stainmil.features.encoders import encoder_table
from stainmil.model.registry import architecture_rows, options_reference_markdown
from stainmil.tables import render_table

with mkdocs_gen_files.open("reference/encoders.md", "w") as page:
    page.write("# Encoder reference\n\nGenerated from `stainmil.features.encoders` (what `stainmil backbones --wide` "
               "prints). How to choose and where the weights come from: [Encoders](../encoders.md).\n\n")
    page.write(render_table(encoder_table(), fmt="markdown"))

with mkdocs_gen_files.open("reference/architectures.md", "w") as page:
    page.write("# Architecture reference\n\nGenerated from `stainmil.model.registry` (`stainmil models`); "
               "`model.architecture: NAME` picks one. How they compare: [Baselines](../baselines.md).\n\n")
    page.write(render_table(architecture_rows(), fmt="markdown"))
    page.write("\n## Options\n\nEach architecture's own settings, `model.options.<name>.<key>` (an old config's "
               "`model.baseline.<key>` is read as these, with a warning).\n\n" + options_reference_markdown())

with mkdocs_gen_files.open("reference/configuration.md", "w") as page:
    page.write("# Configuration reference\n\nGenerated from the dataclasses in `src/stainmil/config.py` "
               "(`stainmil config --reference` prints it). Set any key in a YAML file or with "
               "`--set key=value`.\n\n")
    page.write(config_reference_markdown())

command = typer.main.get_command(app)  # plain help text (the app sets no rich markup)


def leaf_commands(group, prefix=()):
    """(`name`, command) of every command, `export qupath` included, in the order `stainmil --help` lists them."""
    for name in group.list_commands(None):
        sub = group.get_command(None, name)
        if hasattr(sub, "list_commands"):
            yield from leaf_commands(sub, (*prefix, name))
        else:
            yield " ".join((*prefix, name)), sub


def takes_config(sub) -> str:
    options = {o for param in sub.params for o in param.opts}
    return {(True, True): "yes", (False, True): "--set only", (True, False): "--config only"}.get(
        ("--config" in options, "--set" in options), "no")


with mkdocs_gen_files.open("reference/cli.md", "w") as page:
    page.write("# Command reference\n\nGenerated from the CLI (`stainmil COMMAND --help`). An option means the same "
               "thing in every command that takes it. Commands that read a config take `--config FILE` and any "
               "number of `--set section.key=value` ([configuration reference](configuration.md)); the others "
               "work on folders a command made before.\n\n")
    rows = [{"command": f"[`stainmil {name}`](#stainmil-{name.replace(' ', '-')})",
             "takes --config/--set": takes_config(sub),
             "what it does": " ".join(sub.help.split("\n\n")[0].split()).replace("<", "&lt;")}
            for name, sub in leaf_commands(command)]
    page.write(render_table(rows, fmt="markdown") + "\n")
    root = typer.Context(command, info_name="stainmil")
    for name, sub in leaf_commands(command):
        with typer.Context(sub, info_name=name, parent=root, terminal_width=100) as ctx:
            page.write(f"## `stainmil {name}`\n\n```text\n{sub.get_help(ctx)}\n```\n\n")
