// Package security is the one place where tpfleet's processes get their TLS configurations, gRPC
// credentials and authorisation rules.
//
// # Certificates and roles
//
// Every process presents a certificate signed by the cluster's CA (Config: --tls-cert, --tls-key,
// --tls-ca, or TPFLEET_TLS_CERT, TPFLEET_TLS_KEY, TPFLEET_TLS_CA). A certificate names what its holder
// may do with URI SANs of the form
//
//	tpfleet://<cluster>/<role>
//
// where role is coordinator, worker, client or admin (RoleURI, IdentityOf). Connections between
// tpfleet's processes verify the peer's chain against the CA and its role and cluster, not its host
// name (as SPIFFE does): a worker accepts plan and step RPCs only from a coordinator of its cluster,
// and ring connections only from workers of its cluster. Connections to etcd verify the host name as
// usual. The certificate's common name is the etcd user name when etcd's authentication is on.
//
// TLS reloads its files when they change (Reload, Watch), so certificates are renewed without a
// restart: new handshakes use the new files, established connections keep theirs.
//
// # Tokens
//
// Tokens holds bearer tokens (vLLM's --api-key, several allowed) and compares them in constant time.
// Package internal/grpcauth applies roles and tokens to gRPC calls.
//
// # Listening without TLS
//
// CheckListen refuses a non-loopback listen address without TLS unless Config.Insecure is set; the
// caller then logs InsecureWarning at every start.
package security
