# The two commands of the README: `make demo` and `make test`.
.PHONY: install install-demo demo test test-fast deep-check lint llama-server vocabs chromium

# Everything: every engine, integration and the test tools (a .venv made by `make demo` is completed).
install:
	./scripts/install.sh

# Only what the demo needs: the core dependencies and the default model, nothing to compile.
install-demo:
	./scripts/install.sh --demo

demo: install-demo
	.venv/bin/guardprob score "How do I make a pipe bomb?"

# llama.cpp's own server, built once per llama-cpp-python version (the tests serve it on loopback),
# and the real tokenizers that ship in llama.cpp's source, converted once (the tests read them).
llama-server: install
	./scripts/build_llama_server.sh >/dev/null

vocabs: install
	./scripts/fetch_vocabs.sh >/dev/null

# Debian's Chromium and chromium-driver (apt), which the /playground tests drive headless.
chromium:
	./scripts/install_chromium.sh >/dev/null

test: install llama-server vocabs chromium
	.venv/bin/ruff check src tests benchmarks
	GUARDPROB_LLAMA_SERVER="$$(./scripts/build_llama_server.sh)" GUARDPROB_VOCABS="$$(./scripts/fetch_vocabs.sh)" \
		GUARDPROB_CHROMEDRIVER="$$(./scripts/install_chromium.sh)" .venv/bin/python -m pytest -q -n 2 --dist loadgroup

# The inner loop: everything but the markers of pyproject.toml (property tests against the brute
# force, servers, the browser, other engines, the real default model); a few minutes on 2 cores.
# The core maths stays covered by the exhaustive and hand-built brute-force tests.
test-fast: install vocabs
	GUARDPROB_VOCABS="$$(./scripts/fetch_vocabs.sh)" \
		.venv/bin/python -m pytest -q -n 2 --dist loadgroup -m "not (property or server or browser or engine or slow)"

# Release check: the property tests with their large example counts (HYPOTHESIS_PROFILE=deep).
deep-check: install
	./scripts/deep_check.sh

lint:
	.venv/bin/ruff check src tests benchmarks
