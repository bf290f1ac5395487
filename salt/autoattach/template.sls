# -*- coding: utf-8 -*-
# vim: set syntax=yaml ts=2 sw=2 sts=2 et :

##
# autoattach.template
# ===================
#
# The agent in the template of the USB qube, from pillar `autoattach`:
#   - the autoattach package: from the file autoattach:template_package names for this
#     template's distribution (Debian or RedHat), or by name from a configured repository,
#   - with rules_via: template (Qubes R4.1, which cannot pass rules from dom0), the rules in
#     /etc/autoattach/rules.d/50-salt.rules: every qube of this template reads them.
#
# Execute (the template's name: qvm-prefs sys-usb template; for a disposable sys-usb, the
# template of that one):
#   qubesctl --skip-dom0 --targets=TEMPLATE state.apply autoattach.template
# then restart the USB qube.
##

{% from 'autoattach/map.jinja' import autoattach with context %}
{% set source = autoattach.template_package.get(grains['os_family'], '') %}

autoattach-package:
  pkg.installed:
    - name: autoattach
{%- if source %}
    - sources:
      - autoattach: {{ source|yaml_dquote }}
{%- endif %}

{% if autoattach.rules_via == 'template' %}
autoattach-template-rules:
  file.managed:
    - name: /etc/autoattach/rules.d/50-salt.rules
    - user: root
    - group: root
    - mode: '0644'
    - contents: {{ ('# Written by the autoattach Salt formula from the pillar autoattach:rules.\n' ~ autoattach.rules)|yaml_dquote }}
    - require:
      - pkg: autoattach-package
{% endif %}
