"""`tunesmith studio`: the whole job in a browser. The page (static/) calls a small JSON API (app.py)
that reads run directories as they are on disk (runs.py, compare.py), starts the CLI itself as
separate processes (jobs.py), and streams answers from loaded models (chat.py)."""
