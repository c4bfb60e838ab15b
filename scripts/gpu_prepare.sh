#!/usr/bin/env bash
# Prepare a GPU sitting on this (CPU) machine: the ignored folder .gpu/ that the device
# machine receives beside the working tree — wheels it lacks, the embedded model's tokenizer
# (its weights are too big to carry) and the commit the tree is at, since the copy there has
# no .git to read it from. Then run scripts/gpu_sitting.sh there (see README, Benchmarks).
#
#   scripts/gpu_prepare.sh [PYTHON_VERSION]    # the device's Python, default 3.12
#
# The tree must be committed: a figure measured there is traced to this commit.
set -euo pipefail
cd "$(dirname "$0")/.."
python_version=${1:-3.12}
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "error: commit first: the sitting's raw files name the commit it measured" >&2
    exit 2
fi
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl .gpu/tok
# What the device lacks (it has torch with CUDA and triton, transformers, peft, accelerate):
# datasets and its own dependencies, bitsandbytes (the QLoRA row) and liger-kernel.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .gpu/whl \
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash bitsandbytes==0.50.2 liger-kernel
tokenizer=$(python3 -c 'from deltacli.models.loading import resolve; print(resolve("default"))')
cp "$tokenizer"/{tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} .gpu/tok/
git rev-parse --short HEAD > .gpu/commit
du -sh .gpu
echo "prepared .gpu/ for commit $(cat .gpu/commit); carry it: run(carry=['.gpu'], command='scripts/gpu_sitting.sh')"
