#!/usr/bin/env bash
# Checks DESIGN.md's one-way import flow: cmd -> handlers | projections |
# agents -> events. Siblings never import each other; events imports nothing
# of Loom's; only agents/libvirt imports go-libvirt.
set -euo pipefail
cd "$(dirname "$0")/../.."
mod=github.com/loomctl/loom
fail=0
while read -r pkg imports; do
  rel=${pkg#"$mod"}; rel=${rel#/}
  top=${rel%%/*}
  for imp in $imports; do
    case "$imp" in
      github.com/digitalocean/go-libvirt*)
        [[ "$rel" == agents/libvirt* ]] || { echo "$pkg imports go-libvirt: only agents/libvirt may"; fail=1; } ;;
      "$mod"/*)
        itop=${imp#"$mod"/}; itop=${itop%%/*}
        [[ "$itop" == "$top" ]] && continue
        case "$top" in
          events|schemas) echo "$pkg imports $imp: $top imports nothing of Loom's"; fail=1 ;;
          handlers|projections|agents)
            [[ "$itop" == events ]] || { echo "$pkg imports $imp: $top may import only events"; fail=1; } ;;
        esac ;;
    esac
  done
done < <(go list -f '{{.ImportPath}} {{join .Imports " "}}' ./... )
exit $fail
