autoattach:
  allow:
    - {source: sys-usb, class: block, target: sys-usb}
