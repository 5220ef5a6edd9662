"""The management API's request and response bodies (pydantic), shared by the
server (``lunseal.frontends.api``) and the host tools (client, CLI, backup, restore).

Kept out of the server package so host tools do not import the server to
speak to it; the models depend only on pydantic and the engine's domain types.
"""
