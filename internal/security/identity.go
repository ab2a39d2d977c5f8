package security

import (
	"crypto/x509"
	"net/url"
	"slices"
	"strings"
)

// Role is what a certificate allows its holder to do.
type Role string

// The roles of tpfleet's certificates.
const (
	// RoleCoordinator may send plans and steps to the cluster's workers.
	RoleCoordinator Role = "coordinator"
	// RoleWorker may join a TP group's ring and serve steps.
	RoleWorker Role = "worker"
	// RoleClient may call the Generation API.
	RoleClient Role = "client"
	// RoleAdmin may call the Admin API (and the Generation API).
	RoleAdmin Role = "admin"
)

// Roles lists every role, in the order tpfleet certs creates them.
var Roles = []Role{RoleCoordinator, RoleWorker, RoleClient, RoleAdmin}

// URIScheme is the scheme of the URI SANs that carry roles.
const URIScheme = "tpfleet"

// RoleURI is the URI SAN that gives a certificate role r in cluster: tpfleet://<cluster>/<role>.
func RoleURI(cluster string, r Role) *url.URL {
	return &url.URL{Scheme: URIScheme, Host: cluster, Path: "/" + string(r)}
}

// Identity is what a certificate says of its holder.
type Identity struct {
	// Name is the certificate's common name (the etcd user name).
	Name string
	// Cluster is the cluster of the role URIs; empty when the certificate has none, or
	// roles of several clusters (then Roles is empty too).
	Cluster string
	// Roles are the roles of the certificate's role URIs, sorted.
	Roles []Role
}

// IdentityOf reads the identity of a certificate. URI SANs of other schemes are ignored; a
// certificate with role URIs of several clusters has no roles.
func IdentityOf(cert *x509.Certificate) Identity {
	id := Identity{Name: cert.Subject.CommonName}
	for _, u := range cert.URIs {
		if u.Scheme != URIScheme || u.Host == "" {
			continue
		}
		r := Role(strings.TrimPrefix(u.Path, "/"))
		if !slices.Contains(Roles, r) {
			continue
		}
		if id.Cluster != "" && id.Cluster != u.Host {
			return Identity{Name: id.Name}
		}
		id.Cluster = u.Host
		if !slices.Contains(id.Roles, r) {
			id.Roles = append(id.Roles, r)
		}
	}
	slices.Sort(id.Roles)
	return id
}

// Has reports whether the identity has one of roles.
func (id Identity) Has(roles ...Role) bool {
	for _, r := range roles {
		if slices.Contains(id.Roles, r) {
			return true
		}
	}
	return false
}
