#!/usr/bin/env bash
# Exports the committed tree (HEAD) to build/clean for a device call, so the GPU runs exactly
# what is committed while others edit the working tree; the device's copy of .git may be older
# than HEAD, so the commit is written beside the tree (.export_commit) and the GPU scripts and
# the benchmark's JSON header take it from there (JAX_MAMBA_GIT_COMMIT). Then, from the repo root:
#   run(command="cd build/clean && bash scripts/fast_iter.sh ...", carry=["build/clean"])
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
rm -rf build/clean && mkdir -p build/clean
git archive HEAD | tar -x -C build/clean
git rev-parse HEAD > build/clean/.export_commit
echo "build/clean: $(cat build/clean/.export_commit) ($(du -sh build/clean | cut -f1))"
