# -*- coding: utf-8 -*-
# vim: set syntax=yaml ts=2 sw=2 sts=2 et :

# Settings of the autoattach Salt formula: copy to /srv/user_pillar/autoattach/init.sls in
# dom0 and edit. Every key is optional except what your setup needs.
autoattach:
  # The USB qube, and the template it is based on (qvm-prefs sys-usb template; for a
  # disposable sys-usb, the template of that disposable template). The template is also
  # named in /srv/user_pillar/autoattach.top, so that it receives these settings.
  usbvm: sys-usb
  template: debian-12-minimal

  # Packages to install, copied next to the formula in /srv/user_salt/autoattach/files/.
  # Leave one out to install by name from a repository the qube can reach.
  dom0_package: salt://autoattach/files/autoattach-dom0-0.1.0-1.noarch.rpm
  template_package:
    Debian: salt://autoattach/files/autoattach_0.1.0-1_amd64.deb
    RedHat: salt://autoattach/files/autoattach-0.1.0-1.x86_64.rpm

  # Where the rules go: `feature` (Qubes R4.2 and later) sets the USB qube's feature
  # vm-config.autoattach-rules (at most 3071 bytes of UTF-8); `template` (Qubes R4.1) writes them in
  # the template's /etc/autoattach/rules.d/50-salt.rules.
  rules_via: feature
  rules: |
    SUBSYSTEM=="block", ENV{DEVTYPE}=="partition", ATTRS{idVendor}=="0781", ATTRS{idProduct}=="5581", ATTRS{serial}=="4C530001230101115543", ATTACH="backup"

  # The dom0 allowlist: which USB qube may attach which class of device (block or usb) to
  # which qube, with the entry's options (nostart, id=GLOB ...: man autoattach-dom0).
  allow:
    - source: sys-usb
      class: block
      target: backup
    - source: sys-usb
      class: usb
      target: vault
      options: [nostart]
