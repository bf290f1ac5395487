# -*- coding: utf-8 -*-
# vim: set syntax=yaml ts=2 sw=2 sts=2 et :

##
# autoattach.dom0
# ===============
#
# The dom0 side of autoattach, from pillar `autoattach` (see pillar/autoattach/init.sls):
#   - the autoattach-dom0 package (handler, policy, commented allowlist, man page),
#   - the allowlist /etc/qubes/autoattach.conf, from autoattach:allow,
#   - the service `autoattach` turned on in the USB qube (as qvm-service --enable does),
#   - on Qubes R4.2 and later, the USB qube's rules in its feature vm-config.autoattach-rules,
#     which reaches the qube's qubesdb as /vm-config/autoattach-rules (R4.1 has no such
#     bridge: set rules_via: template there, and autoattach.template writes them instead).
#
# Execute:
#   qubesctl state.apply autoattach.dom0
# or, with the tops enabled (README.md of this formula), qubesctl --all state.highstate
##

{% from 'autoattach/map.jinja' import autoattach with context %}

{% if autoattach.rules and autoattach.rules_via == 'feature' and grains.get('osrelease', '')|string|regex_match('^(4\.[01])(\.|\Z)') %}
{{ raise('autoattach pillar: rules_via: feature needs Qubes R4.2 or later (this dom0 is ' ~ grains['osrelease'] ~ '): set rules_via: template') }}
{% endif %}

autoattach-dom0-package:
  pkg.installed:
    - name: autoattach-dom0
{%- if autoattach.dom0_package %}
    - sources:
      - autoattach-dom0: {{ autoattach.dom0_package|yaml_dquote }}
{%- endif %}

# Written whole from the pillar; the package's own copy is a config file rpm keeps
# (autoattach.conf.rpmnew on an upgrade that changes it).
autoattach-allowlist:
  file.managed:
    - name: /etc/qubes/autoattach.conf
    - user: root
    - group: root
    - mode: '0644'
    - contents: |
        # /etc/qubes/autoattach.conf, written by the autoattach Salt formula from the
        # pillar autoattach:allow. Edit the pillar, then: qubesctl state.apply autoattach.dom0
        # Format: man autoattach-dom0, or /usr/share/doc/autoattach-dom0/README.md.
        #   SOURCE  CLASS  TARGET  [OPTION...]
{%- for entry in autoattach.allow %}
        {{ [entry.source, entry['class'], entry.target]|join('  ') }}{% for option in entry.get('options', []) %}  {{ option }}{% endfor %}
{%- endfor %}
    - require:
      - pkg: autoattach-dom0-package

# qvm-service is the feature service.NAME: enabling it makes qubes-sysinit create
# /run/qubes-service/autoattach in the qube at boot, the unit's start condition.
autoattach-usbvm:
  qvm.features:
    - name: {{ autoattach.usbvm }}
    - enable:
      - service.autoattach
{#- Without rules in the pillar, a vm-config.autoattach-rules set by hand stays as it is. #}
{%- if autoattach.rules_via == 'feature' and autoattach.rules %}
    - set:
      - vm-config.autoattach-rules: {{ autoattach.rules|yaml_dquote }}
{%- endif %}
