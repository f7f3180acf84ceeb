//go:build tools

// Package kube pins the Kubernetes commands this module builds (go mod tidy keeps their deps).
package kube

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
