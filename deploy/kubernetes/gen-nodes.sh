#!/bin/sh
# Renders each hypervisor node's certificate and DaemonSet (node.yaml.in, @NODE_NAME@ replaced)
# on standard output, for kubectl apply:
#   deploy/kubernetes/gen-nodes.sh | kubectl apply -f -                  # every node
#   deploy/kubernetes/gen-nodes.sh -l migtun.io/hypervisor=true | kubectl apply -f -
#   deploy/kubernetes/gen-nodes.sh node-a node-b | kubectl apply -f -    # these nodes
# Run it again when a node joins; delete a leaving node's objects with
#   kubectl -n migtun delete daemonset,certificate,secret -l app.kubernetes.io/instance=NODE
set -eu
here=$(dirname "$0")
template="$here/node.yaml.in"
if [ $# -eq 0 ] || [ "$1" = "-l" ]; then
  if [ $# -eq 0 ]; then
    nodes=$(kubectl get nodes -o 'jsonpath={range .items[*]}{.metadata.name}{"\n"}{end}')
  else
    [ $# -eq 2 ] || { echo "usage: $0 [-l SELECTOR | NODE...]" >&2; exit 2; }
    nodes=$(kubectl get nodes -l "$2" -o 'jsonpath={range .items[*]}{.metadata.name}{"\n"}{end}')
  fi
else
  nodes="$*"
fi
[ -n "$nodes" ] || { echo "$0: no nodes" >&2; exit 1; }
for node in $nodes; do
  # A DNS name (it becomes the certificate's SAN and object names) of at most 63 characters
  # (it is also a label value, app.kubernetes.io/instance).
  if ! printf '%s\n' "$node" | grep -Eqx '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*' \
    || [ "${#node}" -gt 63 ]; then
    echo "$0: node name '$node' is not a DNS name of at most 63 characters" >&2
    exit 1
  fi
  printf -- '---\n# node %s\n' "$node"
  sed "s/@NODE_NAME@/$node/g" "$template"
done
