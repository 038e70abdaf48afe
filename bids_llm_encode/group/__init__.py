"""The group level: statistics across participants and models (``statistics``) and the
pipeline step that reads the participants' outputs and writes ``group/`` (``summary``)."""
