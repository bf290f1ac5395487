autoattach:
  allow:
    - {source: sys-usb, class: block, target: work}
    - {source: sys-usb, class: disk, target: work}
