#!/usr/bin/env bash
# Create one virtual environment per peer library under benchmarks/.venvs/<peer>.
#
#   benchmarks/setup_peers.sh                 # every peer, one after the other
#   benchmarks/setup_peers.sh captum pydvl    # only these
#
# PYTHON selects the interpreter (default: python3.11, else python3). Each peer's log is written
# to benchmarks/.venvs/<peer>.log; a peer that fails to install is reported at the end (and in
# benchmarks/.venvs/status.txt, which run.py reads) and does not stop the others.
#
# torch==2.13.0 is always on the same pip command line as the library that needs it: a bare or
# open-ended torch requirement in a fresh environment resolves a CUDA build of several GB.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venvs="$here/.venvs"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
peers=("$@")
[ ${#peers[@]} -eq 0 ] && peers=(captum dattri pydvl influenciae)
mkdir -p "$venvs"

install_peer() {
    local peer="$1" venv="$venvs/$1"
    rm -rf "$venv"
    "$python" -m venv "$venv" || return 1
    local pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
    case "$peer" in
        influenciae)
            # influenciae 0.3.0 declares tensorflow<2.10 (no cp311 wheels); it runs on 2.15.1,
            # so install its real needs by hand and the package itself without dependencies.
            "${pip[@]}" -r "$here/requirements-influenciae.txt" &&
                "${pip[@]}" --no-deps "influenciae==0.3.0" &&
                "$venv/bin/python" -c "import deel.influenciae, tensorflow"
            ;;
        captum)
            "${pip[@]}" -r "$here/requirements-captum.txt" &&
                "$venv/bin/python" -c \
                    "from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction"
            ;;
        dattri)
            "${pip[@]}" -r "$here/requirements-dattri.txt" &&
                "$venv/bin/python" -c "from dattri.algorithm.influence_function import IFAttributorArnoldi"
            ;;
        pydvl)
            "${pip[@]}" -r "$here/requirements-pydvl.txt" &&
                "$venv/bin/python" -c "from pydvl.influence.torch import ArnoldiInfluence"
            ;;
        *)
            echo "unknown peer: $peer (expected captum, dattri, pydvl or influenciae)" >&2
            return 2
            ;;
    esac
}

failed=()
for peer in "${peers[@]}"; do
    echo "== $peer: installing (log: $venvs/$peer.log)"
    start=$(date +%s)
    if install_peer "$peer" >"$venvs/$peer.log" 2>&1; then
        version=$("$venvs/$peer/bin/python" -m pip list 2>/dev/null |
            grep -i -E "^(captum|dattri|pydvl|influenciae|torch|tensorflow-cpu|numpy) " | tr -s ' ' | paste -sd ';')
        echo "$peer ok $version" | tee -a "$venvs/status.txt"
        echo "   done in $(($(date +%s) - start)) s"
    else
        failed+=("$peer")
        echo "$peer FAILED (see $venvs/$peer.log)" | tee -a "$venvs/status.txt"
        tail -5 "$venvs/$peer.log" | sed 's/^/   /'
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "peers that failed to install: ${failed[*]}"
    exit 1
fi
echo "all requested peers installed"
