autoattach:
  allow:
    - {source: sys-usb, class: block, target: work, options: ["nostart bare"]}
