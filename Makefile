# seng-fw on a Debian machine, as root:  make install
#
# Installs seng-fw into its own virtual environment in $(PREFIX) (Debian's python3, so
# the unprivileged service user can run it; a checkout under /root or /home could not
# be), links $(BINDIR)/seng-fw, then `seng-fw install-units`: the systemd units, the
# seng-fw user, /etc/seng-fw/, /etc/seng-fw/policies/ and /var/lib/seng-fw/.
# Needs Debian's python3-venv, python3-dev, gcc, libnetfilter-queue-dev and nftables
# (./bootstrap.sh installs them). Then: seng-fw init; systemctl enable --now seng-fw.

PREFIX ?= /opt/seng-fw
BINDIR ?= /usr/local/bin
PYTHON ?= /usr/bin/python3

.PHONY: install uninstall

install:
	$(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/python -m pip install --quiet --upgrade pip
	$(PREFIX)/bin/python -m pip install --quiet '.[netfilter]'
	ln -sfn $(PREFIX)/bin/seng-fw $(BINDIR)/seng-fw
	$(PREFIX)/bin/seng-fw install-units --source systemd --bin $(BINDIR)/seng-fw

# Keeps /etc/seng-fw (configuration, keys, policies) and /var/lib/seng-fw.
uninstall:
	-systemctl disable --now seng-fw-label.service seng-fw.service seng-fw-policy.service
	rm -f /etc/systemd/system/seng-fw.service /etc/systemd/system/seng-fw-policy.service \
		/etc/systemd/system/seng-fw-label.service
	rm -f /etc/sysusers.d/seng-fw.conf /etc/sysctl.d/60-seng-fw.conf $(BINDIR)/seng-fw
	rm -rf $(PREFIX)
	-systemctl daemon-reload
