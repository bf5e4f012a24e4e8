"""The field's standard flat MIL models, written on ragged cases (see :mod:`stainmil.model.flat`)."""
