module github.com/svsm-e2e/svsm-e2e

go 1.26

require (
	github.com/go-jose/go-jose/v4 v4.1.9
	github.com/google/go-sev-guest v0.15.0
	go.etcd.io/bbolt v1.5.0
)

require (
	github.com/google/go-cmp v0.7.0 // indirect
	github.com/google/go-configfs-tsm v0.2.2 // indirect
	github.com/google/logger v1.1.1 // indirect
	github.com/google/uuid v1.6.0 // indirect
	go.uber.org/multierr v1.11.0 // indirect
	golang.org/x/crypto v0.53.0 // indirect
	golang.org/x/sys v0.46.0 // indirect
	google.golang.org/protobuf v1.36.7 // indirect
)
