"""guardprob inside LLM gateways and rails frameworks (docs/integrations/).

``guardprob.integrations.litellm``: a guardrail for LiteLLM's proxy.
``guardprob.integrations.nemoguardrails``: an action for NeMo Guardrails' input and output rails.

Both judge over a guardprob service (``api_base``) or an in-process classifier; the
framework each one plugs into is imported only by its own module.
"""
