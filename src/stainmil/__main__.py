from stainmil.cli import app

app(prog_name="stainmil")
