#!/usr/bin/env bash
# HERE: put payload part $1 (aa, ab, ...) in the carry folder .payload/.
set -euo pipefail
rm -rf .payload && mkdir .payload
cp ".payload-parts/part.$1" .payload-parts/count .payload/
ls -la .payload
