# Shortcuts for developers; dev.py does the real work with nothing but python3.
#
#   make test           python3 dev.py test (the whole suite; ARGS="-k attack --long" passes options)
#   make run            python3 dev.py run (the embedded demo on port 1110)
#   make fuzz           coverage-guided fuzzing of the command, mbox and PROXY header parsers with
#                       atheris (installed into .venv if missing), FUZZ_SECONDS per harness

PYTHON ?= python3
VENV_PYTHON := .venv/bin/python
FUZZ_SECONDS ?= 60
FUZZ_CORPUS ?= $(or $(TMPDIR),/tmp)/iupop3-fuzz
HARNESSES := session mbox proxy

.PHONY: test run fuzz

test:
	$(PYTHON) dev.py test $(ARGS)

run:
	$(PYTHON) dev.py run $(ARGS)

fuzz:
	$(PYTHON) -c "import dev; dev.ensure_venv(\"test\")"
	$(VENV_PYTHON) -c "import atheris" 2>/dev/null || $(VENV_PYTHON) -m pip install -q atheris
	@for name in $(HARNESSES); do \
	    dict=fuzz/$$name.dict; [ $$name = session ] && dict=fuzz/pop3.dict; \
	    mkdir -p $(FUZZ_CORPUS)/$$name $(FUZZ_CORPUS)/crashes; \
	    echo "fuzz: $$name for $(FUZZ_SECONDS)s, corpus in $(FUZZ_CORPUS)/$$name"; \
	    $(VENV_PYTHON) fuzz/fuzz_$$name.py -max_total_time=$(FUZZ_SECONDS) -dict=$$dict \
	        -artifact_prefix=$(FUZZ_CORPUS)/crashes/$$name- -print_final_stats=1 \
	        $(FUZZ_CORPUS)/$$name || exit 1; \
	done
