#!/usr/bin/env bash
# HERE: put payload part $1 (ort.aa, ort.ab, ..., whl.aa, ...) in the carry folder .payload/.
set -euo pipefail
rm -rf .payload && mkdir .payload
cp ".payload-parts/$1" .payload-parts/*.count .payload/
ls -la .payload
