module github.com/tpfleet/tpfleet

go 1.26
