autoattach:
  allow:
    - {source: sys-usb, class: block, target: dom0}
