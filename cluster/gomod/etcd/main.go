// Command etcd is upstream etcd's server entry point; a wrapper because go install refuses the
// etcd server module (it replaces its sibling modules with local folders).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
