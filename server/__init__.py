"""The HTTP server built on the reference: `python -m server` (the OpenAI API, llama.cpp's /infill, a
page). __main__.py holds the routes and the command line, api.py the wire formats, batcher.py the
worker that owns the model, page.html the page; README.md says how to use it. Nothing at the top level
imports this folder: it is a product of the project, not part of the reference.

    python -m server --model weights-code --port 8000
"""
