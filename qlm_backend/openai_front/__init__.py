"""`qlm-openai`: an OpenAI-compatible HTTP front of the `qlm` router (docs/openai.md).

Every request becomes one gRPC stream to the router model (Triton's asyncio gRPC client), so QLM
schedules it like any other; closing the HTTP stream cancels the gRPC stream, which the router turns
into a cancel in its queue and in the engine. One concept per module:

- config.py: what the front serves (the router's fleet: models, SLO classes) and its settings;
- errors.py: OpenAI's error object, and the router's errors mapped to HTTP statuses;
- slo.py: which SLO class a request gets (header, `service_tier`, `priority`), a small config;
- template.py: chat templates (a documented plain one, or a local tokenizer's own);
- translate.py: OpenAI request bodies validated and translated into the router's request contract;
- upstream.py: the router's gRPC client (one request, one stream);
- shapes.py: the OpenAI response and chunk objects;
- sse.py: server-sent events, and the response that cancels its request when the client leaves;
- app.py: the FastAPI app and its routes; cli.py: the command line (uvicorn).
"""
