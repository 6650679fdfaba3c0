"""mellum2.serve: `mellum2 serve`, an OpenAI-compatible HTTP server over the inference engine
(docs/serve.md). app.py builds the ASGI app, backend.py is the one adapter to the engine, cli.py the
command line (imported only by the dispatcher); importing this package loads none of them."""
