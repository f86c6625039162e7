#!/usr/bin/env sh
# Downloads the stories260K llama2.c checkpoint and its tokenizer (karpathy/tinyllamas, MIT) into a
# directory (default ./models, git-ignored) and checks their sha256. Then:
#   export KVEVICT_MODEL_DIR=$PWD/models
# Usage: scripts/download_model.sh [DIR]
set -eu

dir="${1:-models}"
base="https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K"
mkdir -p "$dir"

fetch() {  # fetch FILE SHA256
  file="$1"
  want="$2"
  if [ ! -f "$dir/$file" ]; then
    echo "downloading $base/$file"
    if command -v curl >/dev/null 2>&1; then
      curl -fL --retry 3 -o "$dir/$file.part" "$base/$file"
    else
      wget -q -O "$dir/$file.part" "$base/$file"
    fi
    mv "$dir/$file.part" "$dir/$file"
  fi
  got="$(sha256sum "$dir/$file" | cut -d' ' -f1)"
  if [ "$got" != "$want" ]; then
    echo "error: $dir/$file has sha256 $got, expected $want (delete it and retry)" >&2
    exit 1
  fi
  echo "ok  $dir/$file"
}

fetch stories260K.bin b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696
fetch tok512.bin 037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312

cat <<MSG

Model files are in $dir. Point kvevict at them:
  export KVEVICT_MODEL_DIR=$(cd "$dir" && pwd)

kvevict-eval also needs text: tinystories_sample.txt (TinyStories stories, CDLA-Sharing-1.0)
has no public single-file home, so it is not downloaded. Any UTF-8 file of stories separated by
lines holding only <|endoftext|> works (the TinyStories dataset's own format):
  kvevict-eval --text my_stories.txt
or save it as $dir/tinystories_sample.txt to make it the default.
MSG
