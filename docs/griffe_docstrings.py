"""A Griffe extension for the Python API page (mkdocs.yml loads it): the code's docstrings, as written, in Markdown.

- Sphinx roles (``:func:`open_run```, ``:class:`~a.b.C```) become code spans (`` `open_run` ``, `` `C` ``).
- A paragraph ending in ``::`` (reST's "a literal block follows") ends in ``:``; the indented block after it is
  already a code block in Markdown.
- A ``<placeholder>`` outside code (``<output_dir>/predictions``) is escaped, not swallowed as an HTML tag.
- A dataclass field or module constant without a docstring takes the comment on its line (``logits: Tensor  #
  (B, C)``) or the comment lines right above it: the shapes and meanings the code keeps there show on the page;
  a config field, its ``setting("...")`` text (what the configuration reference shows).
- A dataclass's fields are listed in one "Attributes" table of the class (name, type, that text) instead of a
  heading each; its properties and methods keep theirs.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize

import griffe

ROLE = re.compile(r":(?:func|meth|class|mod|attr|data|obj|exc|const):`~?([^`]+)`")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
PLACEHOLDER = re.compile(r"<([A-Za-z_][\w .-]*)>")


def _escape_placeholders(line: str) -> str:
    """Escape ``<name>`` outside the code spans of one line of prose."""
    parts, last = [], 0
    for match in CODE_SPAN.finditer(line):
        parts += [PLACEHOLDER.sub(r"&lt;\1&gt;", line[last:match.start()]), match.group(0)]
        last = match.end()
    return "".join(parts) + PLACEHOLDER.sub(r"&lt;\1&gt;", line[last:])


def _role(match: re.Match) -> str:
    target = match.group(1)
    return f"`{target.rsplit('.', 1)[-1] if match.group(0).split('`')[1].startswith('~') else target}`"


def markdown_docstring(text: str) -> str:
    lines, in_block, after_blank = [], False, True
    for line in ROLE.sub(_role, text).split("\n"):
        if line.strip():  # an indented line after a blank one starts a code block; a blank line keeps it going
            in_block = line.startswith("    ") and (in_block or after_blank)
            if not in_block:
                line = _escape_placeholders(line)
                if line.rstrip().endswith("::"):
                    line = line.rstrip()[:-1]
        after_blank = not line.strip()
        lines.append(line)
    return "\n".join(lines)


def _comments(line: str) -> list[str]:
    """The comments of one source line (a line inside a bracket still gives its comment)."""
    found = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(line).readline):
            text = token.string.lstrip("#").strip()
            if token.type == tokenize.COMMENT and not text.startswith(("noqa", "type:", "pragma", "fmt:")):
                found.append(text)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return found


def _docstring(text: str, obj: griffe.Object, agent) -> griffe.Docstring:
    """A docstring parsed like the code's own (the handler's docstring_style)."""
    docstring = griffe.Docstring(text, lineno=obj.lineno, parent=obj, parser=agent.docstring_parser,
                                 parser_options=agent.docstring_options)
    docstring.value = text  # as given: cleandoc would dedent an "Attributes:" section that opens the text
    return docstring


class MarkdownDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)

    def on_attribute_instance(self, *, node, attr: griffe.Attribute, agent, **kwargs) -> None:
        if attr.docstring is not None or attr.lineno is None or attr.filepath is None or "property" in attr.labels:
            return  # a property without a docstring: the comments in its body are about its code
        value = getattr(node, "value", None)
        if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "setting" and value.args \
                and isinstance(value.args[0], ast.Constant) and isinstance(value.args[0].value, str):
            attr.docstring = _docstring(markdown_docstring(value.args[0].value), attr, agent)
            return
        lines = attr.lines_collection
        source = lines[attr.filepath] if attr.filepath in lines else []
        text = " ".join(c for line in source[attr.lineno - 1:attr.endlineno or attr.lineno] for c in _comments(line))
        if not text:  # the comment lines right above the field (not a "# ---- section ----" rule)
            above, n = [], attr.lineno - 2
            while n >= 0 and source[n].strip().startswith("#") and not source[n].strip().startswith("# ---"):
                above.insert(0, source[n].strip().lstrip("#").strip())
                n -= 1
            text = " ".join(above)
        if text:
            attr.docstring = _docstring(markdown_docstring(text), attr, agent)

    def on_class_members(self, *, cls: griffe.Class, agent, **kwargs) -> None:
        if not any("dataclass" in str(decorator.value) for decorator in cls.decorators):
            return
        fields = [member for name, member in cls.members.items() if not name.startswith("_") and member.is_attribute
                  and "instance-attribute" in member.labels and "property" not in member.labels]
        if not fields:
            return
        rows = [f"    {field.name} ({field.annotation}): "
                + " ".join((field.docstring.value if field.docstring else "").split()) for field in fields]
        text = (cls.docstring.value + "\n\n" if cls.docstring else "") + "Attributes:\n" + "\n".join(rows)
        cls.docstring = _docstring(text, cls, agent)
        for field in fields:
            cls.del_member(field.name)
