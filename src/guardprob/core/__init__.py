"""The maths: a verdict language compiled per tokenizer (grammar), the tree and its search with
bounds (tree, search, prior, prefill), what the estimators bound (measures), the estimators,
certified decisions, reasoning before the verdict, scoring runs and streaming moderation.
Nothing here knows about files, the command line or HTTP."""
